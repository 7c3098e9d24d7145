//! The relay side of the node: the home region ([`HomeRelay`]: regions from the rendezvous,
//! their servers, latency, the choice with hysteresis) and the relay link ([`RelayLink`]: one
//! TURN allocation reached over one transport, with the permissions and channels the peers'
//! pairs need).
//!
//! # The relay-transport seam
//!
//! A [`RelayLink`] is "a TURN allocation reached over a transport". Path selection never sees
//! the transport: a relayed pair is a [`PathAddr`](crate::path::PathAddr) with
//! [`Via::Relay`](crate::path::Via), and the node asks the link to frame and route it. What
//! depends on the transport is exactly two things, both in [`RelayTransport`]:
//!
//! * where the link's datagrams go ([`RelayLink::socket`]): for [`RelayTransport::Udp`] the
//!   data socket, to the server's address; a stream transport (TURN over TCP/TLS, RFC 8656
//!   §3.1) sends to [`Socket::Relay`] with the link's id, and the driver writes the bytes to
//!   that link's stream;
//! * which inbound datagrams are the link's ([`RelayLink::owns`]): for UDP the ones on the
//!   data socket from the server's address, for a stream every message read from the link's
//!   stream.
//!
//! **Framing boundary.** The node works on whole STUN messages and whole ChannelData
//! messages, in and out, whatever the transport. On a stream the driver's framer splits the
//! byte stream into whole messages (STUN: 20-byte header + length; ChannelData: 4-byte header +
//! length, padded to a multiple of 4 on streams, RFC 8656 §12.5) before
//! [`Node::handle_datagram`](super::Node::handle_datagram), and adds the padding when writing
//! a [`Socket::Relay`] transmit. TCP/TLS is the [`RelayTransport::Stream`] variant with its two
//! arms here, plus the stream in the driver; path selection is not touched.
//!
//! # Which transport a link uses
//!
//! A region lists TURN URIs (`turn:` UDP, `turn:…?transport=tcp`, `turns:` TLS). The node
//! tries them in the order UDP, TLS, TCP ([`HomeRelay::transports_for`]): UDP when it works;
//! a UDP Allocate that gets no answer at all within [`UDP_FALLBACK_AFTER`] moves the link to
//! TLS, a stream link that has no answer within [`STREAM_FALLBACK_AFTER`] (TCP connect, TLS
//! handshake and Allocate) to the next one. A region that only offers stream URIs starts on
//! the stream. While on a stream, the region's UDP server keeps getting the latency probe
//! (STUN Binding every [`RELAY_MEASURE_INTERVAL`]); once it answers and the last UDP failure is
//! [`UDP_RETRY_AFTER`] old, the link moves back to UDP.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::Socket;
use crate::nat::{choose_relay, RelayLatency};
use crate::turn_client::{Input, TurnClient, TurnCredentials, TurnEvent, TurnOp};
use crate::wire::RelayRegion;

/// How often relay latencies are re-measured (home relay choice, with hysteresis).
pub const RELAY_MEASURE_INTERVAL: Duration = Duration::from_secs(120);
/// How long latency answers are waited for before the home region is chosen.
pub const RELAY_EVAL_WAIT: Duration = Duration::from_millis(1500);
/// Retry interval after the TURN allocation failed.
pub const TURN_RETRY: Duration = Duration::from_secs(15);
/// Retry interval after an Allocate still refused with 437 (Allocation Mismatch) once the
/// TURN client tried to delete the old allocation on our 5-tuple: coturn keeps a released
/// allocation's 5-tuple for a few seconds, and a restart should not wait [`TURN_RETRY`] for it.
pub const TURN_RETRY_MISMATCH: Duration = Duration::from_secs(3);
/// A UDP Allocate with no answer at all (not even a 401 challenge) after this long moves the
/// link to the region's next transport (TLS, then TCP). Three UDP transmissions (0, 0.5 s,
/// 1.5 s) have gone unanswered by then; tens of milliseconds suffice on any working path.
pub const UDP_FALLBACK_AFTER: Duration = Duration::from_secs(3);
/// A stream link (TCP connect, TLS handshake, Allocate) with no answer after this long moves
/// to the region's next transport.
pub const STREAM_FALLBACK_AFTER: Duration = Duration::from_secs(10);
/// After UDP failed, it is tried again (when the region's UDP server answers the latency
/// probe) only this much later, so a path where STUN passes but TURN does not cannot flap.
pub const UDP_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Identity of a relay link (ids are never reused within a node).
pub type LinkId = u32;

/// Which stream a [`RelayTransport::Stream`] is (RFC 8656 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// TURN over TCP (`turn:host?transport=tcp`).
    Tcp,
    /// TURN over TLS over TCP (`turns:host`).
    Tls,
}

/// How a relay link reaches its TURN server (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayTransport {
    /// UDP from the data socket to the server's address.
    Udp {
        /// The TURN server.
        server: SocketAddr,
    },
    /// A TCP or TLS stream the driver keeps to the server ([`Socket::Relay`] with the link's
    /// id); whole STUN/ChannelData messages in and out of the node, the driver frames.
    Stream {
        /// The TURN server.
        server: SocketAddr,
        /// TCP or TLS.
        kind: StreamKind,
    },
}

impl RelayTransport {
    /// The server's address.
    pub fn server(&self) -> SocketAddr {
        match self {
            RelayTransport::Udp { server } | RelayTransport::Stream { server, .. } => *server,
        }
    }

    /// The status spelling (`relay_transport`, `home_relay.transport`): `udp`, `tcp`, `tls`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RelayTransport::Udp { .. } => "udp",
            RelayTransport::Stream {
                kind: StreamKind::Tcp,
                ..
            } => "tcp",
            RelayTransport::Stream {
                kind: StreamKind::Tls,
                ..
            } => "tls",
        }
    }

    /// Whether this is a stream transport.
    pub fn is_stream(&self) -> bool {
        matches!(self, RelayTransport::Stream { .. })
    }
}

/// One way to reach a region's relay: a transport and the URI it came from (its host is the
/// TLS name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayRoute {
    /// The transport with the server's address.
    pub transport: RelayTransport,
    /// The TURN URI.
    pub url: String,
    /// The URI's host (name or IP literal, without brackets): what a TLS certificate is
    /// checked against.
    pub host: String,
}

/// State of a relay link (`meshpunch status`: `home_relay.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Allocate request in flight.
    Allocating,
    /// The allocation exists.
    Allocated,
    /// Allocate or refresh failed; retried after [`TURN_RETRY`].
    Failed,
}

impl LinkState {
    /// The status spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Allocating => "allocating",
            LinkState::Allocated => "allocated",
            LinkState::Failed => "failed",
        }
    }
}

/// What a relay link reports to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The allocation is ready: `relayed` is our relayed candidate.
    Allocated {
        /// Relayed transport address.
        relayed: SocketAddr,
    },
    /// An operation failed; `fatal`: the allocation is gone (Allocate or Refresh).
    Failed {
        /// What went wrong (status text).
        message: String,
        /// The allocation is gone.
        fatal: bool,
        /// When to try again if `fatal` ([`TURN_RETRY`], or [`TURN_RETRY_MISMATCH`] after a 437
        /// to Allocate).
        retry: Duration,
    },
}

/// One TURN allocation reached over one transport (see the module docs).
#[derive(Debug)]
pub struct RelayLink {
    id: LinkId,
    region: String,
    transport: RelayTransport,
    url: String,
    host: String,
    creds: TurnCredentials,
    client: TurnClient,
    state: LinkState,
    error: Option<String>,
    bound: HashSet<SocketAddr>,
    permitted: HashSet<IpAddr>,
    /// The server answered something on this link (a 401 challenge counts).
    heard: bool,
    /// A stream link's stream is connected (UDP: always).
    up: bool,
}

/// A datagram a relay link wants sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkTransmit {
    /// The socket.
    pub socket: Socket,
    /// Destination.
    pub dst: SocketAddr,
    /// Bytes (one whole STUN or ChannelData message).
    pub payload: Vec<u8>,
}

impl RelayLink {
    /// Starts an allocation in `region` over `route` (transaction ids from `seed`). A stream
    /// link waits for [`RelayLink::stream_up`] before it sends its Allocate.
    pub fn new(
        id: LinkId,
        region: &str,
        route: RelayRoute,
        creds: TurnCredentials,
        now: Instant,
        seed: u64,
    ) -> Self {
        let transport = route.transport;
        let mut client = TurnClient::with_seed(transport.server(), creds.clone(), now, seed);
        let up = !transport.is_stream();
        if up {
            client.allocate(now);
        }
        RelayLink {
            id,
            region: region.to_string(),
            transport,
            url: route.url,
            host: route.host,
            creds,
            client,
            state: LinkState::Allocating,
            error: None,
            bound: HashSet::new(),
            permitted: HashSet::new(),
            heard: false,
            up,
        }
    }

    /// The URI this link uses.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URI's host (the TLS name).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether the server has answered anything on this link.
    pub fn heard(&self) -> bool {
        self.heard
    }

    /// Whether the stream is connected (always for UDP).
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// A stream link's stream connected (again): a fresh allocation starts on it (RFC 8656
    /// §3.1: an allocation over TCP/TLS lives and dies with its connection).
    pub fn stream_up(&mut self, now: Instant, seed: u64) {
        if !self.transport.is_stream() || self.up {
            return;
        }
        self.up = true;
        self.client = TurnClient::with_seed(self.transport.server(), self.creds.clone(), now, seed);
        self.client.allocate(now);
        self.state = LinkState::Allocating;
        self.bound.clear();
        self.permitted.clear();
    }

    /// A stream link's stream closed: its allocation is gone with it. The driver reconnects
    /// (with backoff) and reports [`RelayLink::stream_up`].
    pub fn stream_down(&mut self, now: Instant, seed: u64, reason: &str) {
        if !self.transport.is_stream() {
            return;
        }
        if !self.up {
            // Could not connect (refused, timed out, certificate refused): say why.
            self.error = Some(format!("{}: {reason}", self.transport.as_str()));
            return;
        }
        self.up = false;
        // A client with no allocation and nothing in flight: no timers, no transmits.
        self.client = TurnClient::with_seed(self.transport.server(), self.creds.clone(), now, seed);
        self.state = LinkState::Failed;
        self.error = Some(format!(
            "{} stream closed: {reason}",
            self.transport.as_str()
        ));
        self.bound.clear();
        self.permitted.clear();
    }

    /// The link's id.
    pub fn id(&self) -> LinkId {
        self.id
    }

    /// The region it belongs to.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The TURN server's address.
    pub fn server(&self) -> SocketAddr {
        self.transport.server()
    }

    /// Its transport.
    pub fn transport(&self) -> RelayTransport {
        self.transport
    }

    /// State.
    pub fn state(&self) -> LinkState {
        self.state
    }

    /// The last error, if any.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Our relayed address, once allocated.
    pub fn relayed_addr(&self) -> Option<SocketAddr> {
        self.client.relayed_addr()
    }

    /// Whether the allocation exists.
    pub fn is_allocated(&self) -> bool {
        self.client.is_allocated()
    }

    /// Where this link's datagrams go.
    pub fn socket(&self) -> Socket {
        match self.transport {
            RelayTransport::Udp { .. } => Socket::Data,
            RelayTransport::Stream { .. } => Socket::Relay(self.id),
        }
    }

    /// Whether a datagram on `socket` from `from` belongs to this link.
    pub fn owns(&self, socket: Socket, from: SocketAddr) -> bool {
        match self.transport {
            RelayTransport::Udp { server } => socket == Socket::Data && from == server,
            RelayTransport::Stream { .. } => socket == Socket::Relay(self.id),
        }
    }

    /// An inbound message of this link.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) -> Input {
        let r = self
            .client
            .handle_input(now, self.transport.server(), bytes);
        if !matches!(r, Input::NotTurn) {
            self.heard = true;
        }
        r
    }

    /// When [`RelayLink::handle_timeout`] wants to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.client.poll_timeout()
    }

    /// Timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
    }

    /// Installs a permission for `ip` once (RFC 8656 §9: per IP, so any port a peer's
    /// symmetric NAT picks is covered).
    pub fn permit(&mut self, now: Instant, ip: IpAddr) {
        if !self.client.is_allocated() || !self.permitted.insert(ip) {
            return;
        }
        // Refused only without an allocation, checked above.
        let _ = self.client.create_permission(ip, now);
    }

    /// Binds a channel to a peer's relayed address once.
    pub fn ensure_channel(&mut self, now: Instant, peer: SocketAddr) {
        if !self.client.is_allocated() || self.bound.contains(&peer) {
            return;
        }
        if self.client.bind_channel(peer, now).is_ok() {
            self.bound.insert(peer);
        }
    }

    /// Frames `payload` for `peer` into `out`; returns the length.
    pub fn encode_send(&self, peer: SocketAddr, payload: &[u8], out: &mut [u8]) -> Option<usize> {
        self.client.encode_send(peer, payload, out).ok()
    }

    /// Releases the allocation (the Refresh with lifetime 0 is queued).
    pub fn release(&mut self, now: Instant) {
        self.client.release(now);
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<LinkTransmit> {
        let t = self.client.poll_transmit()?;
        Some(LinkTransmit {
            socket: self.socket(),
            dst: t.dst,
            payload: t.payload,
        })
    }

    /// Next event (the TURN client's, reduced to what the node reacts to).
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        while let Some(ev) = self.client.poll_event() {
            match ev {
                TurnEvent::Allocated { relayed, .. } => {
                    self.state = LinkState::Allocated;
                    self.error = None;
                    return Some(LinkEvent::Allocated { relayed });
                }
                TurnEvent::Failed { op, code, reason } => {
                    let message = match code {
                        Some(c) => format!("{op:?} refused by relay: {c} {reason}"),
                        None => format!("{op:?}: relay did not answer ({reason})"),
                    };
                    self.error = Some(message.clone());
                    let fatal = matches!(op, TurnOp::Allocate | TurnOp::Refresh);
                    let retry = if op == TurnOp::Allocate && code == Some(437) {
                        TURN_RETRY_MISMATCH
                    } else {
                        TURN_RETRY
                    };
                    if fatal {
                        self.state = LinkState::Failed;
                        self.bound.clear();
                        self.permitted.clear();
                    }
                    return Some(LinkEvent::Failed {
                        message,
                        fatal,
                        retry,
                    });
                }
                _ => {}
            }
        }
        None
    }
}

/// One region's relay as the home choice sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayProbe {
    /// Region name.
    pub region: String,
    /// Its first TURN URI.
    pub url: String,
    /// Its server's address, once known (literal, or resolved by the driver).
    pub server: Option<SocketAddr>,
    /// Last measured STUN round trip.
    pub latency: Option<Duration>,
    /// `url` is a UDP URI (only those are measured with STUN over UDP).
    pub udp: bool,
}

/// The home-region choice (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct HomeRelay {
    regions: Vec<RelayRegion>,
    probes: Vec<RelayProbe>,
    home: Option<String>,
    next_measure: Option<Instant>,
    eval_at: Option<Instant>,
}

/// What [`HomeRelay::set_regions`] asks of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionsChange {
    /// Same regions and URIs, only fresh credentials.
    pub same_layout: bool,
    /// Host names the driver must resolve: (probe index, `host:port`).
    pub resolve: Vec<(usize, String)>,
}

impl HomeRelay {
    /// New regions from the rendezvous.
    pub fn set_regions(&mut self, now: Instant, regions: Vec<RelayRegion>) -> RegionsChange {
        let same_layout = regions.len() == self.regions.len()
            && regions
                .iter()
                .zip(&self.regions)
                .all(|(a, b)| a.region == b.region && a.urls == b.urls);
        self.regions = regions;
        let mut change = RegionsChange {
            same_layout,
            resolve: Vec::new(),
        };
        if same_layout {
            return change;
        }
        self.probes.clear();
        for (idx, r) in self.regions.iter().enumerate() {
            let url = usable_url(&r.urls).cloned().unwrap_or_default();
            let parsed = crate::turn::uri::TurnUri::parse(&url).ok();
            let udp = parsed
                .as_ref()
                .is_some_and(|u| u.transport == crate::turn::uri::TurnTransport::Udp);
            let auth = parsed.map(|u| u.authority());
            let direct = auth
                .as_deref()
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .map(crate::addr::unmap);
            self.probes.push(RelayProbe {
                region: r.region.clone(),
                url,
                server: direct,
                latency: None,
                udp,
            });
            if direct.is_none() {
                if let Some(auth) = auth {
                    change.resolve.push((idx, auth));
                }
            }
        }
        self.next_measure = Some(now);
        change
    }

    /// The driver resolved probe `idx`'s host name.
    pub fn resolved(&mut self, now: Instant, idx: usize, addr: Option<SocketAddr>) {
        if let Some(p) = self.probes.get_mut(idx) {
            p.server = addr.map(crate::addr::unmap);
        }
        if self.next_measure.is_none_or(|t| t > now) {
            self.next_measure = Some(now);
        }
    }

    /// Servers to measure now (STUN Binding from the data socket), if a measurement is due.
    pub fn measure_due(&mut self, now: Instant) -> Vec<(usize, SocketAddr)> {
        if self.next_measure.is_none_or(|t| t > now) {
            return Vec::new();
        }
        self.next_measure = Some(now + RELAY_MEASURE_INTERVAL);
        self.eval_at = Some(now + RELAY_EVAL_WAIT);
        self.probes
            .iter()
            .enumerate()
            .filter(|(_, p)| p.udp)
            .filter_map(|(i, p)| p.server.map(|s| (i, s)))
            .collect()
    }

    /// A latency answer of probe `idx`.
    pub fn on_latency(&mut self, now: Instant, idx: usize, rtt: Duration) {
        if let Some(p) = self.probes.get_mut(idx) {
            p.latency = Some(rtt);
        }
        if self
            .probes
            .iter()
            .all(|p| p.latency.is_some() || p.server.is_none() || !p.udp)
        {
            self.eval_at = Some(now);
        }
    }

    /// If the evaluation is due: the region to be home now and whether it changed (`None`:
    /// nothing to choose from).
    pub fn evaluate_due(&mut self, now: Instant) -> Option<(String, bool)> {
        if self.eval_at.is_none_or(|t| t > now) {
            return None;
        }
        self.eval_at = None;
        let mut region = choose_relay(self.home.as_deref(), &self.latencies());
        if region.is_none() {
            // No relay answered STUN: still try the first resolvable one.
            region = self
                .probes
                .iter()
                .find(|r| r.server.is_some())
                .map(|r| r.region.clone());
        }
        let region = region?;
        let changed = self.home.as_deref() != Some(region.as_str());
        self.home = Some(region.clone());
        Some((region, changed))
    }

    /// The home region.
    pub fn home(&self) -> Option<&str> {
        self.home.as_deref()
    }

    /// What an allocation in `region` needs: the ways to reach its server, in the order they
    /// are tried (UDP, TLS, TCP; see the module docs), and the credentials. `None` while no
    /// server address is known.
    pub fn allocation_for(&self, region: &str) -> Option<(Vec<RelayRoute>, TurnCredentials)> {
        let routes = self.transports_for(region);
        if routes.is_empty() {
            return None;
        }
        let reg = self.regions.iter().find(|r| r.region == region)?;
        Some((
            routes,
            TurnCredentials {
                username: reg.username.clone(),
                password: reg.password.clone(),
            },
        ))
    }

    /// The region's URIs the node can use, UDP first, then TLS, then TCP (the first URI of
    /// each kind). A URI's address: its IP literal, or the resolved address of the region's
    /// probed URI when the host is the same (with the URI's own port).
    pub fn transports_for(&self, region: &str) -> Vec<RelayRoute> {
        use crate::turn::uri::{TurnTransport, TurnUri};
        let Some(probe) = self.probes.iter().find(|r| r.region == region) else {
            return Vec::new();
        };
        let Some(reg) = self.regions.iter().find(|r| r.region == region) else {
            return Vec::new();
        };
        let probe_host = TurnUri::parse(&probe.url).ok().map(|u| u.host);
        let mut routes = Vec::new();
        for want in [TurnTransport::Udp, TurnTransport::Tls, TurnTransport::Tcp] {
            let Some((url, uri)) = reg
                .urls
                .iter()
                .filter_map(|u| TurnUri::parse(u).ok().map(|p| (u, p)))
                .find(|(_, p)| p.transport == want)
            else {
                continue;
            };
            let host = uri.host.trim_start_matches('[').trim_end_matches(']');
            let ip = host.parse::<IpAddr>().ok().or_else(|| {
                probe_host
                    .as_deref()
                    .filter(|h| *h == uri.host)
                    .and(probe.server)
                    .map(|s| s.ip())
            });
            let Some(ip) = ip else { continue };
            let server = crate::addr::unmap(SocketAddr::new(ip, uri.port));
            let transport = match want {
                TurnTransport::Udp => RelayTransport::Udp { server },
                TurnTransport::Tls => RelayTransport::Stream {
                    server,
                    kind: StreamKind::Tls,
                },
                TurnTransport::Tcp => RelayTransport::Stream {
                    server,
                    kind: StreamKind::Tcp,
                },
            };
            routes.push(RelayRoute {
                transport,
                url: url.clone(),
                host: host.to_string(),
            });
        }
        routes
    }

    /// The address of `region`'s UDP TURN server, if it has one that is known.
    pub fn udp_server(&self, region: &str) -> Option<SocketAddr> {
        self.transports_for(region)
            .into_iter()
            .find_map(|r| match r.transport {
                RelayTransport::Udp { server } => Some(server),
                RelayTransport::Stream { .. } => None,
            })
    }

    /// Probe index of `region`.
    pub fn index_of(&self, region: &str) -> Option<usize> {
        self.probes.iter().position(|r| r.region == region)
    }

    /// Latencies for status and the choice.
    pub fn latencies(&self) -> Vec<RelayLatency> {
        self.probes
            .iter()
            .map(|r| RelayLatency {
                region: r.region.clone(),
                addr: r.url.clone(),
                latency_ms: r.latency.map(|d| d.as_secs_f64() * 1000.0),
            })
            .collect()
    }

    /// When something is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.next_measure, self.eval_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The URI of a region's list that a relay link uses: the first one it can speak (UDP today; a
/// region may list `?transport=tcp` / `turns:` URIs first), else the first one (so status names
/// what the region offered).
pub fn usable_url(urls: &[String]) -> Option<&String> {
    urls.iter()
        .find(|u| turn_uri_authority(u).is_some())
        .or(urls.first())
}

/// `host:port` of a TURN URI the client can use over UDP (`turn:host[:port][?transport=udp]`,
/// RFC 7065, parsed by [`crate::turn::uri::TurnUri`]); `None` for a malformed URI and for
/// TCP/TLS URIs (`?transport=tcp`, `turns:`), which are never quietly used as UDP.
pub fn turn_uri_authority(url: &str) -> Option<String> {
    crate::turn::uri::TurnUri::parse(url)
        .ok()
        .filter(|u| u.transport == crate::turn::uri::TurnTransport::Udp)
        .map(|u| u.authority())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(name: &str, url: &str) -> RelayRegion {
        RelayRegion {
            region: name.into(),
            urls: vec![url.into()],
            username: "u".into(),
            password: "p".into(),
            expires_unix: 0,
        }
    }

    #[test]
    fn the_home_region_is_the_fastest_and_changes_only_with_a_clear_gain() {
        let t0 = Instant::now();
        let mut h = HomeRelay::default();
        let c = h.set_regions(
            t0,
            vec![
                region("eu", "turn:203.0.113.9:3478"),
                region("us", "turn:[::ffff:203.0.113.10]:3478"),
                region("ap", "turn:relay.example.net"),
            ],
        );
        assert!(!c.same_layout);
        assert_eq!(c.resolve, vec![(2, "relay.example.net:3478".to_string())]);
        // The IPv4-mapped spelling is canonical from the start.
        let due = h.measure_due(t0);
        assert_eq!(
            due.iter()
                .map(|(i, a)| (*i, a.to_string()))
                .collect::<Vec<_>>(),
            [
                (0, "203.0.113.9:3478".into()),
                (1, "203.0.113.10:3478".into())
            ]
        );
        assert!(h.measure_due(t0).is_empty());
        h.on_latency(t0, 0, Duration::from_millis(80));
        assert_eq!(h.evaluate_due(t0), None, "waits for the others");
        h.on_latency(t0, 1, Duration::from_millis(30));
        // The unresolved one does not hold the choice up for longer than the wait.
        let at = t0 + RELAY_EVAL_WAIT;
        assert_eq!(h.evaluate_due(at), Some(("us".to_string(), true)));
        assert_eq!(
            h.allocation_for("us")
                .map(|(a, _)| a[0].transport.server().port()),
            Some(3478)
        );
        // Fresh credentials in the same layout change nothing but the credentials.
        let c = h.set_regions(
            at,
            vec![
                region("eu", "turn:203.0.113.9:3478"),
                region("us", "turn:[::ffff:203.0.113.10]:3478"),
                region("ap", "turn:relay.example.net"),
            ],
        );
        assert!(c.same_layout && c.resolve.is_empty());
        // Re-measured: eu is only a little faster now, so home stays (hysteresis) ...
        let t1 = at + RELAY_MEASURE_INTERVAL;
        assert_eq!(h.measure_due(t1).len(), 2);
        h.on_latency(t1, 0, Duration::from_millis(28));
        h.on_latency(t1, 1, Duration::from_millis(30));
        assert_eq!(
            h.evaluate_due(t1 + RELAY_EVAL_WAIT),
            Some(("us".to_string(), false))
        );
        // ... and moves with a clear gain.
        let t2 = t1 + RELAY_MEASURE_INTERVAL;
        assert_eq!(h.measure_due(t2).len(), 2);
        h.on_latency(t2, 0, Duration::from_millis(5));
        h.on_latency(t2, 1, Duration::from_millis(60));
        assert_eq!(
            h.evaluate_due(t2 + RELAY_EVAL_WAIT),
            Some(("eu".to_string(), true))
        );
    }

    #[test]
    fn a_region_is_tried_over_udp_then_tls_then_tcp() {
        let t0 = Instant::now();
        let mut h = HomeRelay::default();
        let mut eu = region("eu", "turns:relay.example.net:443");
        eu.urls
            .push("turn:relay.example.net:3478?transport=tcp".into());
        eu.urls.push("turn:relay.example.net:3478".into());
        eu.urls.push("turns:other.example.net:443".into());
        let mut ap = region("ap", "turns:192.0.2.7:443");
        ap.urls.push("turn:192.0.2.7?transport=tcp".into());
        let c = h.set_regions(t0, vec![eu, ap]);
        // The UDP URI is the one resolved and measured; the stream-only region is never
        // measured over UDP.
        assert_eq!(c.resolve, vec![(0, "relay.example.net:3478".to_string())]);
        assert!(h.measure_due(t0).is_empty());
        h.resolved(
            t0,
            0,
            Some(
                "203.0.113.9:3478"
                    .parse()
                    .unwrap_or_else(|_| unreachable!()),
            ),
        );
        let kinds = |r: &[RelayRoute]| {
            r.iter()
                .map(|r| {
                    (
                        r.transport.as_str(),
                        r.transport.server().to_string(),
                        r.host.clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kinds(&h.transports_for("eu")),
            [
                ("udp", "203.0.113.9:3478".into(), "relay.example.net".into()),
                ("tls", "203.0.113.9:443".into(), "relay.example.net".into()),
                ("tcp", "203.0.113.9:3478".into(), "relay.example.net".into()),
            ]
        );
        assert_eq!(
            kinds(&h.transports_for("ap")),
            [
                ("tls", "192.0.2.7:443".into(), "192.0.2.7".into()),
                ("tcp", "192.0.2.7:3478".into(), "192.0.2.7".into()),
            ]
        );
        assert_eq!(h.udp_server("ap"), None);
        assert_eq!(
            h.udp_server("eu").map(|s| s.to_string()).as_deref(),
            Some("203.0.113.9:3478")
        );
    }

    #[test]
    fn turn_uris_are_parsed() {
        assert_eq!(
            turn_uri_authority("turn:127.0.0.1:3478?transport=udp").as_deref(),
            Some("127.0.0.1:3478")
        );
        assert_eq!(
            turn_uri_authority("turn:relay.example.com").as_deref(),
            Some("relay.example.com:3478")
        );
        assert_eq!(
            turn_uri_authority("turn:relay.example.com:5349").as_deref(),
            Some("relay.example.com:5349")
        );
        assert_eq!(
            turn_uri_authority("turn:[2001:db8::1]:3478").as_deref(),
            Some("[2001:db8::1]:3478")
        );
        let urls = ["turns:r:443".to_string(), "turn:r:3478".to_string()];
        assert_eq!(usable_url(&urls), Some(&urls[1]));
        assert_eq!(usable_url(&urls[..1]), Some(&urls[0]));
        // Stream transports are not UDP relays.
        assert_eq!(turn_uri_authority("turns:relay.example.com"), None);
        assert_eq!(
            turn_uri_authority("turn:relay.example.com?transport=tcp"),
            None
        );
        assert_eq!(
            turn_uri_authority("turn:relay.example.com?transport=sctp"),
            None
        );
    }
}
