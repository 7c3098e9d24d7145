//! Port-mapping driver: runs [`meshpunch_proto::portmap::Mapper`] against the default
//! gateway. It finds the gateway in `/proc/net/route`, talks PCP / NAT-PMP from its own UDP
//! socket to the gateway's port 5351, runs UPnP IGD discovery and the SOAP calls with
//! `igd-next`, and publishes a [`Snapshot`] (what the gateway offers, the mapped address,
//! ignored answers per reason) on a watch channel, so the daemon can turn a mapped address
//! into a candidate and `netcheck` / `status` can report it.
//!
//! Only the data socket's port is mapped, for our own address; [`PortMapper::stop`] deletes
//! the mapping. With `PortMapping = off` nothing here runs: no packet goes to port 5351 or
//! 1900.
//!
//! IPv4 only: PCP and UPnP for IPv6 open firewall pinholes rather than NAT mappings, and an
//! IPv6 host candidate already carries the address.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use igd_next::aio::tokio::Tokio;
use igd_next::aio::Gateway;
use igd_next::{PortMappingProtocol, SearchOptions};
use meshpunch_proto::portmap::{
    Event, IgnoreReason, Mapper, MapperConfig, Report, UpnpReply, UpnpRequest, REQUESTED_LIFETIME,
    SERVER_PORT,
};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

/// How long UPnP discovery (SSDP M-SEARCH, then the device description over HTTP) may take.
pub const UPNP_DISCOVERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`PortMapper::stop`] waits for the UPnP DeletePortMapping call.
pub const DELETE_TIMEOUT: Duration = Duration::from_secs(2);
/// The description UPnP mappings carry (shown in the router's mapping table).
pub const UPNP_DESCRIPTION: &str = "meshpunch";

/// The metric name ignored answers are counted under (label `reason`).
pub const IGNORED_METRIC: &str = "meshpunch_client_portmap_ignored_total";

/// Options.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Use UPnP IGD besides PCP and NAT-PMP.
    pub upnp: bool,
    /// Lifetime to ask for, seconds.
    pub lifetime: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            upnp: true,
            lifetime: REQUESTED_LIFETIME,
        }
    }
}

/// What the port mapper knows now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The gateway asked.
    pub gateway: Option<IpAddr>,
    /// What it offers and our mapped address.
    pub report: Report,
    /// Protocol of the current mapping (`pcp`, `pmp`, `upnp`).
    pub protocol: Option<&'static str>,
    /// The start-up probe is over and no mapping request is pending.
    pub settled: bool,
    /// Answers ignored, per [`IgnoreReason::as_str`] (`meshpunch_client_portmap_ignored_total`).
    pub ignored: BTreeMap<&'static str, u64>,
    /// Gateway restarts noticed (mapping re-created).
    pub gateway_restarts: u64,
}

/// `portmap` in `meshpunch status --json`: what the gateway offers, our mapping, ignored
/// answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortmapStatus {
    /// The default gateway asked.
    pub gateway: Option<IpAddr>,
    /// A UPnP IGD on the gateway answered.
    pub upnp: bool,
    /// NAT-PMP answered.
    pub pmp: bool,
    /// PCP answered.
    pub pcp: bool,
    /// Our mapped public address (the `portmap` candidate).
    pub mapped: Option<SocketAddr>,
    /// Protocol of the mapping: `pcp`, `pmp` or `upnp`.
    pub protocol: Option<String>,
    /// Answers ignored per reason (`meshpunch_client_portmap_ignored_total{reason}`).
    #[serde(default)]
    pub ignored_total: BTreeMap<String, u64>,
    /// Gateway restarts noticed (the mapping was re-created).
    #[serde(default)]
    pub gateway_restarts: u64,
}

impl Snapshot {
    /// The status view.
    pub fn status(&self) -> PortmapStatus {
        PortmapStatus {
            gateway: self.gateway,
            upnp: self.report.upnp,
            pmp: self.report.pmp,
            pcp: self.report.pcp,
            mapped: self.report.mapped,
            protocol: self.protocol.map(str::to_string),
            ignored_total: self
                .ignored
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            gateway_restarts: self.gateway_restarts,
        }
    }
}

/// The default IPv4 gateway from `/proc/net/route` (of the calling thread's network
/// namespace: `/proc/thread-self`, so a thread that entered another namespace reads its own).
pub fn default_gateway_v4() -> Option<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/thread-self/net/route")
        .or_else(|_| std::fs::read_to_string("/proc/net/route"))
        .ok()?;
    parse_proc_net_route(&text)
}

/// The gateway of the default route (destination 0.0.0.0/0 with the RTF_GATEWAY flag) with the
/// lowest metric in `/proc/net/route` text; fields are hexadecimal, addresses little-endian.
pub fn parse_proc_net_route(text: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    let mut best: Option<(u32, Ipv4Addr)> = None;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(dest), Some(gw), Some(flags), Some(metric), Some(mask)) =
            (f.get(1), f.get(2), f.get(3), f.get(6), f.get(7))
        else {
            continue;
        };
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dest), Some(gw), Some(flags), Some(metric), Some(mask)) = (
            hex(dest),
            hex(gw),
            hex(flags),
            metric.parse::<u32>().ok(),
            hex(mask),
        ) else {
            continue;
        };
        if dest != 0 || mask != 0 || flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY {
            continue;
        }
        let ip = Ipv4Addr::from(gw.to_le_bytes());
        if best.is_none_or(|(m, _)| metric < m) {
            best = Some((metric, ip));
        }
    }
    best.map(|(_, ip)| ip)
}

/// Our source address towards `gateway` (PCP's client address; the UPnP internal client).
fn local_ip_towards(gateway: IpAddr) -> std::io::Result<IpAddr> {
    let s = std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))?;
    // Marked like the mapper's socket, so the route looked up is the one its packets take.
    crate::fwmark::apply(&s)?;
    s.connect(SocketAddr::new(gateway, SERVER_PORT))?;
    Ok(s.local_addr()?.ip())
}

/// A running port mapper (a task); [`PortMapper::stop`] deletes the mapping.
#[derive(Debug)]
pub struct PortMapper {
    state: watch::Receiver<Snapshot>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

enum Internal {
    Found(Arc<Gateway<Tokio>>, IpAddr),
    Reply(UpnpReply),
}

impl PortMapper {
    /// Starts mapping `internal_port` (the data socket's) through the default gateway;
    /// `None` when there is no default IPv4 gateway.
    pub fn start_default(internal_port: u16, opts: Options) -> std::io::Result<Option<Self>> {
        match default_gateway_v4() {
            Some(gw) => Self::start(IpAddr::V4(gw), internal_port, opts).map(Some),
            None => Ok(None),
        }
    }

    /// Starts mapping `internal_port` through `gateway`.
    pub fn start(gateway: IpAddr, internal_port: u16, opts: Options) -> std::io::Result<Self> {
        let client_ip = local_ip_towards(gateway)?;
        let std_sock = std::net::UdpSocket::bind(SocketAddr::new(client_ip, 0))?;
        // `FwMark`: in a full tunnel the gateway is reached outside the tunnel.
        crate::fwmark::apply(&std_sock)?;
        std_sock.set_nonblocking(true)?;
        let sock = UdpSocket::from_std(std_sock)?;
        let cfg = MapperConfig {
            gateway,
            client_ip,
            internal_port,
            lifetime: opts.lifetime,
            upnp: opts.upnp,
            nonce: rand::random(),
        };
        let (tx, state) = watch::channel(Snapshot {
            gateway: Some(gateway),
            ..Snapshot::default()
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(sock, cfg, tx, stop_rx));
        Ok(PortMapper {
            state,
            stop: Some(stop_tx),
            task,
        })
    }

    /// A receiver of every change.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.state.clone()
    }

    /// The current state.
    pub fn snapshot(&self) -> Snapshot {
        self.state.borrow().clone()
    }

    /// Waits (at most `max`) until the probe is over and no mapping request is pending.
    pub async fn settled(&self, max: Duration) -> Snapshot {
        let mut rx = self.state.clone();
        let _ = tokio::time::timeout(max, rx.wait_for(|s| s.settled)).await;
        let s = rx.borrow().clone();
        s
    }

    /// Deletes the mapping (lifetime 0 / DeletePortMapping) and ends the task.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(DELETE_TIMEOUT + Duration::from_secs(1), &mut self.task).await;
    }
}

impl Drop for PortMapper {
    fn drop(&mut self) {
        // Dropped without stop(): the task ends with its channel (still deleting the mapping).
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn discover(client_ip: IpAddr, gateway: IpAddr) -> Internal {
    let mut o = SearchOptions::default();
    o.bind_addr = SocketAddr::new(client_ip, 0);
    o.timeout = Some(UPNP_DISCOVERY_TIMEOUT);
    o.single_search_timeout = Some(UPNP_DISCOVERY_TIMEOUT);
    let found = async {
        let gw = igd_next::aio::tokio::search_gateway(o).await.ok()?;
        let ext = gw.get_external_ip().await.ok()?;
        Some((gw, ext))
    };
    match tokio::time::timeout(UPNP_DISCOVERY_TIMEOUT * 2, found).await {
        Ok(Some((gw, ext))) => {
            tracing::debug!(device = %gw.addr, %gateway, external = %ext, "UPnP IGD found");
            Internal::Found(Arc::new(gw), ext)
        }
        _ => Internal::Reply(UpnpReply::NotFound),
    }
}

async fn add(
    gw: Arc<Gateway<Tokio>>,
    local: SocketAddr,
    external_port: u16,
    lifetime: u32,
) -> Internal {
    let udp = PortMappingProtocol::UDP;
    let r = match gw
        .add_port(udp, external_port, local, lifetime, UPNP_DESCRIPTION)
        .await
    {
        Ok(()) => Ok(external_port),
        Err(e) => {
            tracing::debug!(error = %e, external_port, "UPnP AddPortMapping refused; asking for any port");
            gw.add_any_port(udp, local, lifetime, UPNP_DESCRIPTION)
                .await
                .map_err(|e| e.to_string())
        }
    };
    match r {
        Ok(external_port) => Internal::Reply(UpnpReply::Added {
            external_port,
            lifetime,
        }),
        Err(e) => {
            tracing::info!(error = %e, "UPnP AddPortMapping failed");
            Internal::Reply(UpnpReply::Failed)
        }
    }
}

fn on_event(s: &mut Snapshot, e: Event) {
    match e {
        Event::Mapped(a) => {
            tracing::info!(mapped = ?a, "port mapping changed");
            s.report.mapped = a;
        }
        Event::Ignored(r) => {
            let n = s.ignored.entry(r.as_str()).or_default();
            *n += 1;
            // Logged at the 1st, 2nd, 4th, 8th, ... of each reason: a host on the LAN that
            // floods us with answers cannot flood the log.
            if n.is_power_of_two() {
                tracing::warn!(
                    reason = r.as_str(),
                    total = *n,
                    metric = IGNORED_METRIC,
                    "port-mapping answer ignored"
                );
            }
        }
        Event::GatewayRestarted(p) => {
            tracing::info!(
                protocol = p.as_str(),
                "gateway lost its mappings; re-creating ours"
            );
            s.gateway_restarts += 1;
        }
        Event::Failed(p) => {
            tracing::info!(
                protocol = p.as_str(),
                "port-mapping request refused or unanswered"
            );
        }
    }
}

async fn run(
    sock: UdpSocket,
    cfg: MapperConfig,
    tx: watch::Sender<Snapshot>,
    mut stop: oneshot::Receiver<()>,
) {
    let local = SocketAddr::new(cfg.client_ip, cfg.internal_port);
    let mut m = Mapper::new(cfg);
    let (itx, mut irx) = mpsc::channel::<Internal>(8);
    let mut igd: Option<Arc<Gateway<Tokio>>> = None;
    let mut buf = vec![0u8; 1500];
    m.start(Instant::now());
    let mut stopping = false;
    loop {
        // Perform what the machine asks for.
        while let Some(t) = m.poll_transmit() {
            if let Err(e) = sock.send_to(&t.payload, t.dst).await {
                tracing::debug!(error = %e, dst = %t.dst, "port-mapping send failed");
            }
        }
        while let Some(r) = m.poll_upnp() {
            match r {
                UpnpRequest::Discover => {
                    let itx = itx.clone();
                    tokio::spawn(async move {
                        let _ = itx.send(discover(cfg.client_ip, cfg.gateway).await).await;
                    });
                }
                UpnpRequest::Add {
                    external_port,
                    lifetime,
                    ..
                } => match igd.clone() {
                    Some(gw) => {
                        let itx = itx.clone();
                        tokio::spawn(async move {
                            let _ = itx
                                .send(add(gw, local, external_port, lifetime).await)
                                .await;
                        });
                    }
                    None => m.handle_upnp(Instant::now(), UpnpReply::Failed),
                },
                UpnpRequest::Delete { external_port } => {
                    if let Some(gw) = igd.clone() {
                        let del = gw.remove_port(PortMappingProtocol::UDP, external_port);
                        match tokio::time::timeout(DELETE_TIMEOUT, del).await {
                            Ok(Ok(())) => tracing::info!(external_port, "UPnP mapping deleted"),
                            Ok(Err(e)) => {
                                tracing::info!(error = %e, "UPnP DeletePortMapping failed")
                            }
                            Err(_) => tracing::info!("UPnP DeletePortMapping timed out"),
                        }
                    }
                }
            }
        }
        tx.send_if_modified(|s| {
            let before = s.clone();
            while let Some(e) = m.poll_event() {
                on_event(s, e);
            }
            let sup = m.support();
            s.report.pcp = sup.pcp;
            s.report.pmp = sup.pmp;
            s.report.upnp = sup.upnp;
            s.report.mapped = m.mapped();
            s.protocol = m
                .protocol()
                .filter(|_| m.mapped().is_some())
                .map(|p| p.as_str());
            s.settled = stopping || (m.probe_done() && !m.mapping_pending());
            *s != before
        });
        // After stop: only until the gateway confirmed the deletion (or it timed out).
        if stopping && !m.deleting() {
            return;
        }
        let wake = m.poll_timeout();
        let sleep = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    m.handle_datagram(Instant::now(), from, buf.get(..n).unwrap_or_default());
                }
            }
            Some(i) = irx.recv() => {
                match i {
                    Internal::Found(gw, ext) => {
                        let device = gw.addr.ip();
                        if meshpunch_proto::addr::canonical_ip(device) == meshpunch_proto::addr::canonical_ip(cfg.gateway) {
                            igd = Some(gw);
                        }
                        m.handle_upnp(Instant::now(), UpnpReply::Found { device, external_ip: ext });
                    }
                    Internal::Reply(r) => m.handle_upnp(Instant::now(), r),
                }
            }
            () = sleep => m.handle_timeout(Instant::now()),
            _ = &mut stop, if !stopping => {
                m.stop(Instant::now());
                stopping = true;
            }
        }
    }
}

/// Label values of [`IGNORED_METRIC`] (every reason, for documentation and status).
pub fn ignored_reasons() -> impl Iterator<Item = &'static str> {
    IgnoreReason::ALL.into_iter().map(IgnoreReason::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_with_the_lowest_metric_wins() {
        let t =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
                 eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                 tun0\t00000000\t00000000\t0001\t0\t0\t50\t00000000\t0\t0\t0\n";
        assert_eq!(parse_proc_net_route(t), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(parse_proc_net_route("Iface\tDestination\n"), None);
        assert_eq!(parse_proc_net_route("garbage\nx y z\n\u{0}\n"), None);
    }
}
