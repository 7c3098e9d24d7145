//! Port mapping: ask the home gateway to forward a public port to our data socket, with PCP
//! (RFC 6887), NAT-PMP (RFC 6886) or UPnP IGD, so a peer can reach us directly even behind a
//! NAT whose ordinary mappings depend on the destination (symmetric NAT).
//!
//! [`pcp`] and [`pmp`] are the codecs. [`Mapper`] is the sans-IO machine: the driver
//! (`client/src/portmap.rs`) feeds it datagrams from the gateway's port 5351, the outcome of
//! UPnP operations (it runs igd-next for the SOAP/HTTP part) and timer wake-ups, and performs
//! what it returns: [`Mapper::poll_transmit`] (datagrams to the gateway),
//! [`Mapper::poll_upnp`] (UPnP operations), [`Mapper::poll_event`], [`Mapper::poll_timeout`].
//!
//! What it does:
//! 1. **Probe** ([`Mapper::start`]): a PCP ANNOUNCE and a NAT-PMP external-address request
//!    to the gateway (retransmitted every [`RETRANSMIT`]) and a UPnP discovery, for at most
//!    [`PROBE_TIMEOUT`] (UPnP discovery has its own timeout in the driver).
//! 2. **Map** the data socket's port with the best protocol found: PCP, else NAT-PMP, else
//!    UPnP (a protocol whose mapping request fails or times out after [`MAP_TIMEOUT`] gives
//!    way to the next). Nothing found: probe again after [`RECHECK`].
//! 3. **Renew** at half the granted lifetime; a mapping not renewed by its expiry is gone
//!    ([`Event::Mapped`]`(None)`) and the machine probes again.
//! 4. **Re-create after a gateway restart**: an epoch that went backwards (or fell behind our
//!    clock, RFC 6887 §8.5) means the gateway lost its mappings; the mapping is requested again
//!    at once ([`Event::GatewayRestarted`]). A renewal re-creates a vanished mapping anyway.
//! 5. **Delete on clean exit** ([`Mapper::stop`]): lifetime 0 (PCP, NAT-PMP) or
//!    DeletePortMapping (UPnP).
//!
//! Every answer is validated; what fails is ignored, changes no state and is reported as
//! [`Event::Ignored`] with an [`IgnoreReason`] (the driver counts them in
//! `meshpunch_client_portmap_ignored_total{reason}`): a source other than the gateway's port
//! 5351, bytes that do not parse, a PCP nonce that is not ours, an epoch that ran ahead of our
//! own clock (no real gateway does that: a forged or replayed answer), an external address that
//! is not public ([`crate::addr::classify`]: a gateway behind another NAT, or a lie), an
//! answer to nothing we asked, and a UPnP device that is not the gateway.
//!
//! Only the data socket's own port is ever mapped (UDP), for our own address.

pub mod pcp;
pub mod pmp;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::addr::{classify, AddrClass};

/// The gateway port PCP and NAT-PMP servers listen on (RFC 6887 §19.1, RFC 6886 §3.1).
pub const SERVER_PORT: u16 = 5351;
/// How long the start-up probe waits for PCP and NAT-PMP answers (a gateway on the LAN
/// answers in a few milliseconds; Tailscale waits about 250 ms).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// First retransmission interval of a request to the gateway, doubling per try (RFC 6886
/// §3.1 starts at 250 ms).
pub const RETRANSMIT: Duration = Duration::from_millis(250);
/// Longest retransmission interval (renewals of long leases).
pub const RETRANSMIT_MAX: Duration = Duration::from_secs(16);
/// How long a PCP or NAT-PMP mapping request may go unanswered before the next protocol is
/// tried.
pub const MAP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a deletion ([`Mapper::stop`]) is retransmitted while the gateway has not
/// confirmed it.
pub const DELETE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a UPnP AddPortMapping may take (SOAP over HTTP on the LAN) before it counts as
/// failed.
pub const UPNP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime we ask for, seconds (RFC 6886 §3.3 recommends 7200; the gateway may grant less).
pub const REQUESTED_LIFETIME: u32 = 7200;
/// When no protocol answered (or every mapping failed): probe again after this long.
pub const RECHECK: Duration = Duration::from_secs(600);
/// Renewals are never scheduled sooner than this after a grant (a gateway granting 1 s must
/// not make us send a request per millisecond).
pub const MIN_RENEW: Duration = Duration::from_secs(1);

/// A port-mapping protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// Port Control Protocol (RFC 6887).
    Pcp,
    /// NAT Port Mapping Protocol (RFC 6886).
    Pmp,
    /// UPnP Internet Gateway Device (WANIPConnection AddPortMapping).
    Upnp,
}

impl Protocol {
    /// Short, fixed label (metrics, status).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::Pmp => "pmp",
            Protocol::Upnp => "upnp",
        }
    }
}

/// Which protocols the gateway answered (successfully) when probed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Support {
    /// PCP answered.
    pub pcp: bool,
    /// NAT-PMP answered (with a public external address).
    pub pmp: bool,
    /// A UPnP IGD on the gateway was found.
    pub upnp: bool,
}

/// What netcheck and status report about port mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// A UPnP IGD on the gateway answered.
    pub upnp: bool,
    /// NAT-PMP answered.
    pub pmp: bool,
    /// PCP answered.
    pub pcp: bool,
    /// Our mapped public address (`ip:port`), if a mapping is held.
    pub mapped: Option<SocketAddr>,
}

impl Report {
    /// One line: which protocols answered and the mapped address.
    pub fn to_line(&self) -> String {
        let mut p: Vec<&str> = Vec::new();
        if self.pcp {
            p.push("PCP");
        }
        if self.pmp {
            p.push("NAT-PMP");
        }
        if self.upnp {
            p.push("UPnP");
        }
        let offered = if p.is_empty() {
            "none offered".to_string()
        } else {
            p.join(", ")
        };
        match self.mapped {
            Some(a) => format!("{offered}; mapped {a}"),
            None => format!("{offered}; no mapping"),
        }
    }
}

/// Why an answer was ignored (label values of `meshpunch_client_portmap_ignored_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IgnoreReason {
    /// It did not come from the gateway's port 5351.
    NotGateway,
    /// It does not parse as a PCP or NAT-PMP response.
    Malformed,
    /// A PCP MAP answer with a nonce that is not ours.
    WrongNonce,
    /// An epoch that ran ahead of our own clock since the last answer.
    WrongEpoch,
    /// An external address that is not public (private, CGNAT, loopback, reserved, …).
    PrivateExternal,
    /// An answer to nothing we asked (wrong opcode, port or protocol for our state).
    Unsolicited,
    /// A UPnP device (SSDP answer) on another host than the gateway.
    UpnpElsewhere,
}

impl IgnoreReason {
    /// Every reason (metric pre-registration).
    pub const ALL: [IgnoreReason; 7] = [
        IgnoreReason::NotGateway,
        IgnoreReason::Malformed,
        IgnoreReason::WrongNonce,
        IgnoreReason::WrongEpoch,
        IgnoreReason::PrivateExternal,
        IgnoreReason::Unsolicited,
        IgnoreReason::UpnpElsewhere,
    ];

    /// Short, fixed label.
    pub fn as_str(self) -> &'static str {
        match self {
            IgnoreReason::NotGateway => "not_gateway",
            IgnoreReason::Malformed => "malformed",
            IgnoreReason::WrongNonce => "wrong_nonce",
            IgnoreReason::WrongEpoch => "wrong_epoch",
            IgnoreReason::PrivateExternal => "private_external",
            IgnoreReason::Unsolicited => "unsolicited",
            IgnoreReason::UpnpElsewhere => "upnp_elsewhere",
        }
    }
}

/// What the machine reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Our mapped (public) address changed: a new mapping, a different one, or none.
    Mapped(Option<SocketAddr>),
    /// An answer was ignored (and changed nothing).
    Ignored(IgnoreReason),
    /// The gateway lost its mappings (epoch); the mapping is being re-created.
    GatewayRestarted(Protocol),
    /// A mapping request with this protocol was refused or went unanswered.
    Failed(Protocol),
}

/// A datagram to send to the gateway (from the driver's port-mapping socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination (the gateway's port 5351).
    pub dst: SocketAddr,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A UPnP operation for the driver to perform; it answers with [`Mapper::handle_upnp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpnpRequest {
    /// SSDP discovery of an IGD, then its external address.
    Discover,
    /// AddPortMapping, UDP, to our `internal_port`, asking for `external_port` (the driver
    /// may fall back to any port the device picks).
    Add {
        /// The data socket's port.
        internal_port: u16,
        /// External port wanted.
        external_port: u16,
        /// Lease, seconds.
        lifetime: u32,
    },
    /// DeletePortMapping, UDP.
    Delete {
        /// The external port mapped.
        external_port: u16,
    },
}

/// The driver's answer to an [`UpnpRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpnpReply {
    /// An IGD was found: the host its description and control URLs are on, and the
    /// external address it reports.
    Found {
        /// The device's IP (from the SSDP LOCATION / control URL).
        device: IpAddr,
        /// GetExternalIPAddress.
        external_ip: IpAddr,
    },
    /// Discovery found nothing within its timeout.
    NotFound,
    /// AddPortMapping succeeded.
    Added {
        /// External port mapped.
        external_port: u16,
        /// Lease granted, seconds.
        lifetime: u32,
    },
    /// AddPortMapping failed.
    Failed,
}

/// The machine's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapperConfig {
    /// The default gateway (the only source answers are accepted from).
    pub gateway: IpAddr,
    /// Our address towards the gateway (PCP's client address field).
    pub client_ip: IpAddr,
    /// The data socket's port: the one port mapped.
    pub internal_port: u16,
    /// Lifetime asked for, seconds ([`REQUESTED_LIFETIME`]).
    pub lifetime: u32,
    /// Whether to use UPnP IGD (the driver can do it).
    pub upnp: bool,
    /// The PCP MAP nonce: 96 unpredictable bits from the OS random source (RFC 6887 §11.1:
    /// off-path attackers must not guess it).
    pub nonce: pcp::Nonce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    PcpAnnounce,
    PmpExternal,
    PcpMap,
    PmpMap,
    Delete,
}

#[derive(Debug, Clone)]
struct Outstanding {
    asked: Asked,
    payload: Vec<u8>,
    next: Instant,
    interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    NotStarted,
    Probing {
        deadline: Instant,
    },
    Mapping {
        proto: Protocol,
        deadline: Instant,
    },
    Mapped {
        proto: Protocol,
        external: SocketAddr,
        renew_at: Instant,
        expires_at: Instant,
    },
    Waiting {
        recheck_at: Instant,
    },
    Stopped,
}

#[derive(Debug, Clone, Copy)]
struct Epoch {
    server: u32,
    at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EpochVerdict {
    Fine,
    Restarted,
    Ahead,
}

/// RFC 6887 §8.5 (and RFC 6886 §3.6): is the server's new epoch consistent with the time
/// that passed on our clock?
fn check_epoch(prev: Option<Epoch>, epoch: u32, now: Instant) -> EpochVerdict {
    let Some(p) = prev else {
        return EpochVerdict::Fine;
    };
    if u64::from(epoch) + 1 < u64::from(p.server) {
        return EpochVerdict::Restarted;
    }
    let server_delta = u64::from(epoch.saturating_sub(p.server));
    let client_delta = now.saturating_duration_since(p.at).as_secs();
    if client_delta + 2 < server_delta - server_delta / 16 {
        return EpochVerdict::Ahead;
    }
    if server_delta + 2 < client_delta - client_delta / 16 {
        return EpochVerdict::Restarted;
    }
    EpochVerdict::Fine
}

/// The port-mapping machine (see the module docs for what it does and in which order).
#[derive(Debug)]
pub struct Mapper {
    cfg: MapperConfig,
    phase: Phase,
    support: Support,
    /// Probe answers still expected (PCP, NAT-PMP, UPnP).
    probe_pending: [bool; 3],
    /// When the PCP and NAT-PMP probe answers stop being waited for.
    probe_deadline: Option<Instant>,
    /// While a deletion is unconfirmed: when we stop retransmitting it.
    delete_deadline: Option<Instant>,
    failed: Vec<Protocol>,
    pmp_external: Option<IpAddr>,
    upnp_external: Option<IpAddr>,
    pcp_epoch: Option<Epoch>,
    pmp_epoch: Option<Epoch>,
    outstanding: Vec<Outstanding>,
    transmits: VecDeque<Transmit>,
    upnp_out: VecDeque<UpnpRequest>,
    upnp_busy: bool,
    events: VecDeque<Event>,
    mapped: Option<SocketAddr>,
    last_external_port: Option<u16>,
}

impl Mapper {
    /// A machine that does nothing until [`Mapper::start`].
    pub fn new(cfg: MapperConfig) -> Self {
        Mapper {
            cfg,
            phase: Phase::NotStarted,
            support: Support::default(),
            probe_pending: [false; 3],
            probe_deadline: None,
            delete_deadline: None,
            failed: Vec::new(),
            pmp_external: None,
            upnp_external: None,
            pcp_epoch: None,
            pmp_epoch: None,
            outstanding: Vec::new(),
            transmits: VecDeque::new(),
            upnp_out: VecDeque::new(),
            upnp_busy: false,
            events: VecDeque::new(),
            mapped: None,
            last_external_port: None,
        }
    }

    /// Starts (or restarts) the probe.
    pub fn start(&mut self, now: Instant) {
        if self.phase == Phase::Stopped {
            return;
        }
        self.failed.clear();
        // A new probe: what the gateway supported before is asked again.
        self.support = Support::default();
        self.pmp_external = None;
        self.upnp_external = None;
        self.outstanding
            .retain(|o| !matches!(o.asked, Asked::PcpAnnounce | Asked::PmpExternal));
        self.probe_pending = [true, true, self.cfg.upnp];
        self.probe_deadline = Some(now + PROBE_TIMEOUT);
        let client = self.cfg.client_ip;
        self.ask(
            now,
            Asked::PcpAnnounce,
            pcp::announce_request(client).to_vec(),
        );
        self.ask(
            now,
            Asked::PmpExternal,
            pmp::external_address_request().to_vec(),
        );
        if self.cfg.upnp && !self.upnp_busy {
            self.upnp_busy = true;
            self.upnp_out.push_back(UpnpRequest::Discover);
        }
        if !matches!(self.phase, Phase::Mapped { .. }) {
            self.phase = Phase::Probing {
                deadline: now + PROBE_TIMEOUT,
            };
        }
    }

    /// Clean exit: deletes the mapping (lifetime 0 / DeletePortMapping) and stops. A PCP or
    /// NAT-PMP deletion is retransmitted until the gateway confirms it, for at most
    /// [`DELETE_TIMEOUT`] ([`Mapper::deleting`]).
    pub fn stop(&mut self, now: Instant) {
        let proto = match self.phase {
            Phase::Mapped { proto, .. } | Phase::Mapping { proto, .. } => Some(proto),
            _ => None,
        };
        self.outstanding.clear();
        let port = self.cfg.internal_port;
        match proto {
            Some(Protocol::Pcp) => {
                let b = pcp::map_request(self.cfg.client_ip, self.cfg.nonce, port, 0, 0);
                self.ask(now, Asked::Delete, b.to_vec());
                self.delete_deadline = Some(now + DELETE_TIMEOUT);
            }
            Some(Protocol::Pmp) => {
                self.ask(
                    now,
                    Asked::Delete,
                    pmp::map_udp_request(port, 0, 0).to_vec(),
                );
                self.delete_deadline = Some(now + DELETE_TIMEOUT);
            }
            Some(Protocol::Upnp) => {
                if let Some(external_port) = self.last_external_port {
                    self.upnp_out
                        .push_back(UpnpRequest::Delete { external_port });
                }
            }
            None => {}
        }
        self.phase = Phase::Stopped;
        self.probe_deadline = None;
        self.set_mapped(None);
    }

    /// Whether a deletion after [`Mapper::stop`] still waits for the gateway's confirmation.
    pub fn deleting(&self) -> bool {
        self.delete_deadline.is_some()
    }

    /// What the gateway answered to the probe so far.
    pub fn support(&self) -> Support {
        self.support
    }

    /// Whether the probe is over: every protocol answered or its time ran out.
    pub fn probe_done(&self) -> bool {
        self.phase != Phase::NotStarted && self.probe_pending == [false; 3]
    }

    /// Our current mapped address.
    pub fn mapped(&self) -> Option<SocketAddr> {
        self.mapped
    }

    /// The protocol of the current (or pending) mapping.
    pub fn protocol(&self) -> Option<Protocol> {
        match self.phase {
            Phase::Mapped { proto, .. } | Phase::Mapping { proto, .. } => Some(proto),
            _ => None,
        }
    }

    /// Whether a mapping request is in flight (no answer, no timeout yet).
    pub fn mapping_pending(&self) -> bool {
        matches!(self.phase, Phase::Mapping { .. } | Phase::Probing { .. })
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next UPnP operation to perform.
    pub fn poll_upnp(&mut self) -> Option<UpnpRequest> {
        self.upnp_out.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Mapper::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::NotStarted | Phase::Stopped => None,
            Phase::Probing { deadline } | Phase::Mapping { deadline, .. } => Some(deadline),
            Phase::Mapped {
                renew_at,
                expires_at,
                ..
            } => Some(renew_at.min(expires_at)),
            Phase::Waiting { recheck_at } => Some(recheck_at),
        };
        let rtx = self
            .outstanding
            .iter()
            .map(|o| o.next)
            .chain(self.probe_deadline)
            .chain(self.delete_deadline)
            .min();
        match (phase, rtx) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Timers: retransmissions, the probe deadline, renewals, expiry, recheck.
    pub fn handle_timeout(&mut self, now: Instant) {
        let dst = self.server();
        for o in &mut self.outstanding {
            if o.next <= now {
                self.transmits.push_back(Transmit {
                    dst,
                    payload: o.payload.clone(),
                });
                o.interval = (o.interval * 2).min(RETRANSMIT_MAX);
                o.next = now + o.interval;
            }
        }
        if self.delete_deadline.is_some_and(|d| now >= d) {
            self.delete_deadline = None;
            self.outstanding.clear();
        }
        if self.probe_deadline.is_some_and(|d| now >= d) {
            self.probe_deadline = None;
            self.outstanding
                .retain(|o| !matches!(o.asked, Asked::PcpAnnounce | Asked::PmpExternal));
            self.probe_pending[0] = false;
            self.probe_pending[1] = false;
        }
        match self.phase {
            Phase::Probing { deadline } if now >= deadline => {
                self.choose(now);
            }
            Phase::Mapping { proto, deadline } if now >= deadline => {
                self.fail(now, proto);
            }
            Phase::Mapped { expires_at, .. } if now >= expires_at => {
                self.outstanding.clear();
                self.set_mapped(None);
                self.phase = Phase::NotStarted;
                self.start(now);
            }
            Phase::Mapped {
                proto,
                external,
                renew_at,
                expires_at,
            } if now >= renew_at => {
                // Renew once per grant: the retransmissions carry it until expiry.
                self.phase = Phase::Mapped {
                    proto,
                    external,
                    renew_at: expires_at,
                    expires_at,
                };
                self.request_map(now, proto);
            }
            Phase::Waiting { recheck_at } if now >= recheck_at => {
                self.phase = Phase::NotStarted;
                self.start(now);
            }
            _ => {}
        }
    }

    /// A datagram arrived on the port-mapping socket from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        match self.phase {
            // Only the confirmation of our deletion still matters.
            Phase::Stopped => return self.on_delete_answer(from, bytes),
            Phase::NotStarted => return self.ignore(IgnoreReason::Unsolicited),
            _ => {}
        }
        let from = crate::addr::unmap(from);
        if from != self.server() {
            return self.ignore(IgnoreReason::NotGateway);
        }
        match bytes.first() {
            Some(&pcp::VERSION) => match pcp::parse_response(bytes) {
                Ok(r) => self.on_pcp(now, r),
                Err(_) => self.ignore(IgnoreReason::Malformed),
            },
            Some(&pmp::VERSION) => match pmp::parse_response(bytes) {
                Ok(r) => self.on_pmp(now, r),
                Err(_) => self.ignore(IgnoreReason::Malformed),
            },
            _ => self.ignore(IgnoreReason::Malformed),
        }
    }

    /// The driver's answer to a UPnP operation.
    pub fn handle_upnp(&mut self, now: Instant, reply: UpnpReply) {
        if self.phase == Phase::Stopped {
            return;
        }
        match reply {
            UpnpReply::Found {
                device,
                external_ip,
            } => {
                self.upnp_busy = false;
                if crate::addr::canonical_ip(device) != crate::addr::canonical_ip(self.cfg.gateway)
                {
                    self.probe_pending[2] = false;
                    self.ignore(IgnoreReason::UpnpElsewhere);
                    return self.after_probe_answer(now);
                }
                if classify(external_ip) != AddrClass::Public {
                    self.probe_pending[2] = false;
                    self.ignore(IgnoreReason::PrivateExternal);
                    return self.after_probe_answer(now);
                }
                self.support.upnp = true;
                self.upnp_external = Some(external_ip);
                self.probe_pending[2] = false;
                self.after_probe_answer(now);
            }
            UpnpReply::NotFound => {
                self.upnp_busy = false;
                self.probe_pending[2] = false;
                self.after_probe_answer(now);
            }
            UpnpReply::Added {
                external_port,
                lifetime,
            } => {
                let upnp_state = matches!(
                    self.phase,
                    Phase::Mapping {
                        proto: Protocol::Upnp,
                        ..
                    } | Phase::Mapped {
                        proto: Protocol::Upnp,
                        ..
                    }
                );
                let Some(ip) = self.upnp_external.filter(|_| upnp_state) else {
                    return self.ignore(IgnoreReason::Unsolicited);
                };
                if external_port == 0 {
                    return self.ignore(IgnoreReason::Unsolicited);
                }
                self.granted(
                    now,
                    Protocol::Upnp,
                    SocketAddr::new(ip, external_port),
                    lifetime,
                );
            }
            UpnpReply::Failed => {
                if let Phase::Mapping {
                    proto: Protocol::Upnp,
                    ..
                } = self.phase
                {
                    self.fail(now, Protocol::Upnp);
                }
            }
        }
    }

    /// After [`Mapper::stop`]: the gateway's answer to our deletion ends the retransmissions.
    fn on_delete_answer(&mut self, from: SocketAddr, bytes: &[u8]) {
        if self.delete_deadline.is_none() || crate::addr::unmap(from) != self.server() {
            return;
        }
        let confirmed = match bytes.first() {
            Some(&pcp::VERSION) => pcp::parse_response(bytes).is_ok_and(|r| {
                r.opcode == pcp::OP_MAP
                    && r.map.is_some_and(|m| {
                        m.nonce == self.cfg.nonce && m.internal_port == self.cfg.internal_port
                    })
            }),
            Some(&pmp::VERSION) => matches!(
                pmp::parse_response(bytes),
                Ok(pmp::Response::MapUdp { internal_port, .. }) if internal_port == self.cfg.internal_port
            ),
            _ => false,
        };
        if confirmed {
            self.delete_deadline = None;
            self.outstanding.clear();
        }
    }

    fn server(&self) -> SocketAddr {
        SocketAddr::new(self.cfg.gateway, SERVER_PORT)
    }

    fn ignore(&mut self, r: IgnoreReason) {
        self.events.push_back(Event::Ignored(r));
    }

    fn transmit(&mut self, payload: Vec<u8>) {
        let dst = self.server();
        self.transmits.push_back(Transmit { dst, payload });
    }

    fn ask(&mut self, now: Instant, asked: Asked, payload: Vec<u8>) {
        self.outstanding.retain(|o| o.asked != asked);
        self.transmit(payload.clone());
        self.outstanding.push(Outstanding {
            asked,
            payload,
            next: now + RETRANSMIT,
            interval: RETRANSMIT,
        });
    }

    fn answered(&mut self, asked: Asked) -> bool {
        let before = self.outstanding.len();
        self.outstanding.retain(|o| o.asked != asked);
        before != self.outstanding.len()
    }

    fn set_mapped(&mut self, m: Option<SocketAddr>) {
        if self.mapped != m {
            self.mapped = m;
            self.events.push_back(Event::Mapped(m));
        }
    }

    fn epoch(&mut self, proto: Protocol, epoch: u32, now: Instant) -> EpochVerdict {
        let slot = match proto {
            Protocol::Pcp => &mut self.pcp_epoch,
            _ => &mut self.pmp_epoch,
        };
        let v = check_epoch(*slot, epoch, now);
        if v != EpochVerdict::Ahead {
            *slot = Some(Epoch {
                server: epoch,
                at: now,
            });
        }
        v
    }

    fn on_pcp(&mut self, now: Instant, r: pcp::Response) {
        // A PCP-only gateway answers our NAT-PMP request with UNSUPP_VERSION in PCP format
        // (RFC 6887 §9).
        if r.result == pcp::ResultCode::UnsupportedVersion {
            if self.answered(Asked::PmpExternal) {
                self.probe_pending[1] = false;
                return self.after_probe_answer(now);
            }
            return self.ignore(IgnoreReason::Unsolicited);
        }
        match r.opcode {
            pcp::OP_ANNOUNCE => {
                if !self
                    .outstanding
                    .iter()
                    .any(|o| o.asked == Asked::PcpAnnounce)
                    && !matches!(
                        self.phase,
                        Phase::Mapped {
                            proto: Protocol::Pcp,
                            ..
                        }
                    )
                {
                    return self.ignore(IgnoreReason::Unsolicited);
                }
                if r.result != pcp::ResultCode::Success {
                    self.answered(Asked::PcpAnnounce);
                    self.probe_pending[0] = false;
                    return self.after_probe_answer(now);
                }
                let v = self.epoch(Protocol::Pcp, r.epoch, now);
                if v == EpochVerdict::Ahead {
                    return self.ignore(IgnoreReason::WrongEpoch);
                }
                self.answered(Asked::PcpAnnounce);
                self.support.pcp = true;
                self.probe_pending[0] = false;
                if v == EpochVerdict::Restarted {
                    self.restarted(now, Protocol::Pcp);
                }
                self.after_probe_answer(now);
            }
            pcp::OP_MAP => {
                let ours = matches!(
                    self.phase,
                    Phase::Mapping {
                        proto: Protocol::Pcp,
                        ..
                    } | Phase::Mapped {
                        proto: Protocol::Pcp,
                        ..
                    }
                );
                if !ours {
                    return self.ignore(IgnoreReason::Unsolicited);
                }
                let Some(m) = r.map else {
                    // An error answer without MAP data cannot be tied to our nonce.
                    return self.ignore(IgnoreReason::Unsolicited);
                };
                if m.nonce != self.cfg.nonce {
                    return self.ignore(IgnoreReason::WrongNonce);
                }
                if m.protocol != pcp::PROTO_UDP || m.internal_port != self.cfg.internal_port {
                    return self.ignore(IgnoreReason::Unsolicited);
                }
                if r.result == pcp::ResultCode::Success && (r.lifetime == 0 || m.external_port == 0)
                {
                    return self.ignore(IgnoreReason::Unsolicited);
                }
                if r.result == pcp::ResultCode::Success
                    && classify(m.external_ip) != AddrClass::Public
                {
                    return self.ignore(IgnoreReason::PrivateExternal);
                }
                let v = self.epoch(Protocol::Pcp, r.epoch, now);
                if v == EpochVerdict::Ahead {
                    return self.ignore(IgnoreReason::WrongEpoch);
                }
                self.answered(Asked::PcpMap);
                if r.result != pcp::ResultCode::Success {
                    return self.fail(now, Protocol::Pcp);
                }
                if v == EpochVerdict::Restarted {
                    self.events
                        .push_back(Event::GatewayRestarted(Protocol::Pcp));
                }
                self.granted(
                    now,
                    Protocol::Pcp,
                    SocketAddr::new(m.external_ip, m.external_port),
                    r.lifetime,
                );
            }
            _ => self.ignore(IgnoreReason::Unsolicited),
        }
    }

    fn on_pmp(&mut self, now: Instant, r: pmp::Response) {
        match r {
            pmp::Response::Error { opcode, result } => {
                // A NAT-PMP-only gateway answers our PCP request with "unsupported version"
                // in NAT-PMP format (RFC 6887 §9); any other result-only answer ends what it
                // answers.
                if result == pmp::ResultCode::UnsupportedVersion
                    && self.answered(Asked::PcpAnnounce)
                {
                    self.probe_pending[0] = false;
                    self.after_probe_answer(now);
                } else if result == pmp::ResultCode::UnsupportedVersion
                    && self.answered(Asked::PcpMap)
                {
                    self.fail(now, Protocol::Pcp);
                } else if opcode == pmp::OP_EXTERNAL_ADDRESS && self.answered(Asked::PmpExternal) {
                    self.probe_pending[1] = false;
                    self.after_probe_answer(now);
                } else if self.answered(Asked::PcpAnnounce) {
                    self.probe_pending[0] = false;
                    self.after_probe_answer(now);
                } else if opcode == pmp::OP_MAP_UDP && self.answered(Asked::PmpMap) {
                    self.fail(now, Protocol::Pmp);
                } else {
                    self.ignore(IgnoreReason::Unsolicited);
                }
            }
            pmp::Response::ExternalAddress {
                result,
                epoch,
                external,
            } => {
                if !self
                    .outstanding
                    .iter()
                    .any(|o| o.asked == Asked::PmpExternal)
                {
                    return self.ignore(IgnoreReason::Unsolicited);
                }
                if result != pmp::ResultCode::Success {
                    self.answered(Asked::PmpExternal);
                    self.probe_pending[1] = false;
                    return self.after_probe_answer(now);
                }
                if classify(IpAddr::V4(external)) != AddrClass::Public {
                    return self.ignore(IgnoreReason::PrivateExternal);
                }
                let v = self.epoch(Protocol::Pmp, epoch, now);
                if v == EpochVerdict::Ahead {
                    return self.ignore(IgnoreReason::WrongEpoch);
                }
                self.answered(Asked::PmpExternal);
                self.pmp_external = Some(IpAddr::V4(external));
                self.support.pmp = true;
                self.probe_pending[1] = false;
                if v == EpochVerdict::Restarted {
                    self.restarted(now, Protocol::Pmp);
                }
                self.after_probe_answer(now);
            }
            pmp::Response::MapUdp {
                result,
                epoch,
                internal_port,
                external_port,
                lifetime,
            } => {
                let ours = matches!(
                    self.phase,
                    Phase::Mapping {
                        proto: Protocol::Pmp,
                        ..
                    } | Phase::Mapped {
                        proto: Protocol::Pmp,
                        ..
                    }
                );
                let Some(ip) = self.pmp_external.filter(|_| ours) else {
                    return self.ignore(IgnoreReason::Unsolicited);
                };
                if internal_port != self.cfg.internal_port
                    || (result == pmp::ResultCode::Success && (lifetime == 0 || external_port == 0))
                {
                    return self.ignore(IgnoreReason::Unsolicited);
                }
                let v = self.epoch(Protocol::Pmp, epoch, now);
                if v == EpochVerdict::Ahead {
                    return self.ignore(IgnoreReason::WrongEpoch);
                }
                self.answered(Asked::PmpMap);
                if result != pmp::ResultCode::Success {
                    return self.fail(now, Protocol::Pmp);
                }
                if v == EpochVerdict::Restarted {
                    self.events
                        .push_back(Event::GatewayRestarted(Protocol::Pmp));
                }
                self.granted(
                    now,
                    Protocol::Pmp,
                    SocketAddr::new(ip, external_port),
                    lifetime,
                );
            }
        }
    }

    /// The gateway lost its state: ask for our mapping again if it was made with `proto`.
    fn restarted(&mut self, now: Instant, proto: Protocol) {
        if let Phase::Mapped { proto: p, .. } = self.phase {
            if p == proto {
                self.events.push_back(Event::GatewayRestarted(proto));
                self.request_map(now, proto);
            }
        }
    }

    /// A probe answer arrived: map now if PCP is there or nothing else is awaited.
    fn after_probe_answer(&mut self, now: Instant) {
        match self.phase {
            Phase::Probing { .. }
                if self.support.pcp || self.probe_pending[..2] == [false, false] =>
            {
                self.choose(now)
            }
            // A late UPnP discovery after everything else failed.
            Phase::Waiting { .. } if self.support.upnp => self.choose(now),
            _ => {}
        }
    }

    fn choose(&mut self, now: Instant) {
        let usable = |p: Protocol, ok: bool, failed: &[Protocol]| ok && !failed.contains(&p);
        let pick = if usable(Protocol::Pcp, self.support.pcp, &self.failed) {
            Some(Protocol::Pcp)
        } else if usable(Protocol::Pmp, self.support.pmp, &self.failed) {
            Some(Protocol::Pmp)
        } else if usable(Protocol::Upnp, self.support.upnp, &self.failed) {
            Some(Protocol::Upnp)
        } else {
            None
        };
        match pick {
            Some(p) => {
                let deadline = now
                    + if p == Protocol::Upnp {
                        UPNP_TIMEOUT
                    } else {
                        MAP_TIMEOUT
                    };
                self.phase = Phase::Mapping { proto: p, deadline };
                self.request_map(now, p);
            }
            // Still waiting for UPnP discovery: stay in the probe without a deadline of our
            // own (the driver's discovery timeout answers NotFound).
            None if self.probe_pending[2] => {
                self.phase = Phase::Probing {
                    deadline: now + UPNP_TIMEOUT,
                };
            }
            None => {
                self.phase = Phase::Waiting {
                    recheck_at: now + RECHECK,
                };
            }
        }
    }

    fn request_map(&mut self, now: Instant, proto: Protocol) {
        let port = self.cfg.internal_port;
        let want = self.last_external_port.unwrap_or(port);
        match proto {
            Protocol::Pcp => {
                let b = pcp::map_request(
                    self.cfg.client_ip,
                    self.cfg.nonce,
                    port,
                    want,
                    self.cfg.lifetime,
                );
                self.ask(now, Asked::PcpMap, b.to_vec());
            }
            Protocol::Pmp => {
                let b = pmp::map_udp_request(port, want, self.cfg.lifetime);
                self.ask(now, Asked::PmpMap, b.to_vec());
            }
            Protocol::Upnp => self.upnp_out.push_back(UpnpRequest::Add {
                internal_port: port,
                external_port: want,
                lifetime: self.cfg.lifetime,
            }),
        }
    }

    fn fail(&mut self, now: Instant, proto: Protocol) {
        self.events.push_back(Event::Failed(proto));
        self.outstanding
            .retain(|o| !matches!(o.asked, Asked::PcpMap | Asked::PmpMap));
        if !self.failed.contains(&proto) {
            self.failed.push(proto);
        }
        if self.mapped.is_some() {
            self.set_mapped(None);
        }
        self.choose(now);
    }

    fn granted(&mut self, now: Instant, proto: Protocol, external: SocketAddr, lifetime: u32) {
        let life = Duration::from_secs(u64::from(lifetime));
        let renew = (life / 2).max(MIN_RENEW);
        self.last_external_port = Some(external.port());
        self.failed.clear();
        self.phase = Phase::Mapped {
            proto,
            external,
            renew_at: now + renew,
            expires_at: now + life.max(renew + MIN_RENEW),
        };
        self.set_mapped(Some(external));
    }
}

#[cfg(test)]
mod tests;
