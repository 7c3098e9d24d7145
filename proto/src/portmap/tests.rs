//! The mapper against a simulated gateway, with simulated time.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::*;

const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
const ME: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const PORT: u16 = 41641;
const NONCE: pcp::Nonce = [0x5a; 12];

fn cfg(upnp: bool) -> MapperConfig {
    MapperConfig {
        gateway: IpAddr::V4(GW),
        client_ip: IpAddr::V4(ME),
        internal_port: PORT,
        lifetime: REQUESTED_LIFETIME,
        upnp,
        nonce: NONCE,
    }
}

fn gw_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(GW), SERVER_PORT)
}

/// A gateway speaking PCP and/or NAT-PMP, with an epoch clock that a restart resets.
struct Gateway {
    pcp: bool,
    pmp: bool,
    booted: Instant,
    grant: u32,
    /// internal port -> (external port, expiry)
    maps: HashMap<u16, (u16, Instant)>,
    next_port: u16,
    requests: Vec<Vec<u8>>,
    /// Answer nothing (a dead or filtering gateway).
    silent: bool,
}

impl Gateway {
    fn new(pcp: bool, pmp: bool, now: Instant) -> Self {
        Gateway {
            pcp,
            pmp,
            booted: now - Duration::from_secs(1000),
            grant: 7200,
            maps: HashMap::new(),
            next_port: 60000,
            requests: Vec::new(),
            silent: false,
        }
    }

    fn epoch(&self, now: Instant) -> u32 {
        u32::try_from(now.duration_since(self.booted).as_secs()).unwrap_or(u32::MAX)
    }

    fn restart(&mut self, now: Instant) {
        self.booted = now;
        self.maps.clear();
        self.next_port += 7;
    }

    fn map(&mut self, now: Instant, internal: u16, life: u32) -> u16 {
        if life == 0 {
            self.maps.remove(&internal);
            return 0;
        }
        let ext = match self.maps.get(&internal) {
            Some((e, _)) => *e,
            None => {
                self.next_port += 1;
                self.next_port
            }
        };
        self.maps
            .insert(internal, (ext, now + Duration::from_secs(u64::from(life))));
        ext
    }

    fn answer(&mut self, now: Instant, req: &[u8]) -> Option<Vec<u8>> {
        self.requests.push(req.to_vec());
        if self.silent {
            return None;
        }
        let epoch = self.epoch(now);
        match req.first()? {
            2 if self.pcp => {
                let op = req[1];
                let life = u32::from_be_bytes(req[4..8].try_into().ok()?);
                if op == pcp::OP_ANNOUNCE {
                    return Some(pcp::encode_response(&pcp::Response {
                        opcode: op,
                        result: pcp::ResultCode::Success,
                        lifetime: 0,
                        epoch,
                        map: None,
                    }));
                }
                let nonce: pcp::Nonce = req[24..36].try_into().ok()?;
                let internal = u16::from_be_bytes([req[40], req[41]]);
                let life = life.min(self.grant);
                let ext = self.map(now, internal, life);
                Some(pcp::encode_response(&pcp::Response {
                    opcode: op,
                    result: pcp::ResultCode::Success,
                    lifetime: life,
                    epoch,
                    map: Some(pcp::MapData {
                        nonce,
                        protocol: req[36],
                        internal_port: internal,
                        external_port: ext,
                        external_ip: IpAddr::V4(EXT),
                    }),
                }))
            }
            2 => Some(pmp::encode_response(&pmp::Response::Error {
                opcode: 0,
                result: pmp::ResultCode::UnsupportedVersion,
            })),
            0 if self.pmp => match req.get(1)? {
                0 => Some(pmp::encode_response(&pmp::Response::ExternalAddress {
                    result: pmp::ResultCode::Success,
                    epoch,
                    external: EXT,
                })),
                1 => {
                    let internal = u16::from_be_bytes([req[4], req[5]]);
                    let life = u32::from_be_bytes(req[8..12].try_into().ok()?).min(self.grant);
                    let ext = self.map(now, internal, life);
                    Some(pmp::encode_response(&pmp::Response::MapUdp {
                        result: pmp::ResultCode::Success,
                        epoch,
                        internal_port: internal,
                        external_port: ext,
                        lifetime: life,
                    }))
                }
                _ => None,
            },
            _ => None,
        }
    }
}

/// Moves datagrams between the mapper and the gateway until both are quiet; UPnP requests
/// are answered by `upnp` (or left unanswered when it returns None). Returns the events.
fn exchange(
    m: &mut Mapper,
    gw: &mut Gateway,
    now: Instant,
    upnp: &mut dyn FnMut(UpnpRequest) -> Option<UpnpReply>,
) -> Vec<Event> {
    for _ in 0..100 {
        let mut moved = false;
        while let Some(t) = m.poll_transmit() {
            assert_eq!(
                t.dst,
                gw_addr(),
                "only the gateway's 5351 is ever addressed"
            );
            moved = true;
            if let Some(a) = gw.answer(now, &t.payload) {
                m.handle_datagram(now, gw_addr(), &a);
            }
        }
        while let Some(r) = m.poll_upnp() {
            moved = true;
            if let Some(a) = upnp(r) {
                m.handle_upnp(now, a);
            }
        }
        if !moved {
            break;
        }
    }
    std::iter::from_fn(|| m.poll_event()).collect()
}

/// Runs timers up to `until` (jumping from wake-up to wake-up), exchanging after each.
fn run_until(
    m: &mut Mapper,
    gw: &mut Gateway,
    now: &mut Instant,
    until: Instant,
    upnp: &mut dyn FnMut(UpnpRequest) -> Option<UpnpReply>,
) -> Vec<Event> {
    let mut ev = exchange(m, gw, *now, upnp);
    for _ in 0..10_000 {
        match m.poll_timeout() {
            Some(t) if t <= until => {
                *now = t.max(*now);
                m.handle_timeout(*now);
                ev.extend(exchange(m, gw, *now, upnp));
            }
            _ => break,
        }
    }
    *now = until;
    ev
}

/// [`run_until`] `d` from now.
fn run_for(
    m: &mut Mapper,
    gw: &mut Gateway,
    now: &mut Instant,
    d: Duration,
    upnp: &mut dyn FnMut(UpnpRequest) -> Option<UpnpReply>,
) -> Vec<Event> {
    let until = *now + d;
    run_until(m, gw, now, until, upnp)
}

fn no_upnp(_: UpnpRequest) -> Option<UpnpReply> {
    None
}

fn ext(port: u16) -> Option<SocketAddr> {
    Some(SocketAddr::new(IpAddr::V4(EXT), port))
}

#[test]
fn pcp_is_preferred_and_the_lease_is_renewed_at_half_life() {
    let mut now = Instant::now();
    let mut gw = Gateway::new(true, true, now);
    let mut m = Mapper::new(cfg(false));
    m.start(now);
    let ev = run_for(
        &mut m,
        &mut gw,
        &mut now,
        Duration::from_secs(1),
        &mut no_upnp,
    );
    assert_eq!(ev, vec![Event::Mapped(ext(60001))]);
    assert_eq!(m.protocol(), Some(Protocol::Pcp));
    assert_eq!(
        m.support(),
        Support {
            pcp: true,
            pmp: true,
            upnp: false
        }
    );
    assert!(m.probe_done());
    // The only mapping request is PCP MAP for our port with our nonce.
    let maps: Vec<_> = gw.requests.iter().filter(|r| r.len() == 60).collect();
    assert_eq!(maps.len(), 1);
    assert_eq!(&maps[0][24..36], &NONCE);
    // Renewal at half the 7200 s lifetime, not before.
    let n = gw.requests.len();
    let t0 = now;
    run_until(
        &mut m,
        &mut gw,
        &mut now,
        t0 + Duration::from_secs(3598),
        &mut no_upnp,
    );
    assert_eq!(gw.requests.len(), n);
    let ev = run_until(
        &mut m,
        &mut gw,
        &mut now,
        t0 + Duration::from_secs(3602),
        &mut no_upnp,
    );
    assert_eq!(gw.requests.len(), n + 1, "one renewal");
    assert!(ev.is_empty(), "same mapping after renewal: {ev:?}");
    // A day later it is still mapped (renewed every hour).
    let ev = run_until(
        &mut m,
        &mut gw,
        &mut now,
        t0 + Duration::from_secs(86400),
        &mut no_upnp,
    );
    assert!(ev.is_empty());
    assert_eq!(m.mapped(), ext(60001));
}

#[test]
fn nat_pmp_is_used_when_there_is_no_pcp() {
    let mut now = Instant::now();
    let mut gw = Gateway::new(false, true, now);
    gw.grant = 120;
    let mut m = Mapper::new(cfg(false));
    m.start(now);
    let ev = run_for(
        &mut m,
        &mut gw,
        &mut now,
        Duration::from_secs(1),
        &mut no_upnp,
    );
    assert_eq!(ev, vec![Event::Mapped(ext(60001))]);
    assert_eq!(m.protocol(), Some(Protocol::Pmp));
    assert_eq!(
        m.support(),
        Support {
            pcp: false,
            pmp: true,
            upnp: false
        }
    );
    let n = gw.requests.len();
    run_for(
        &mut m,
        &mut gw,
        &mut now,
        Duration::from_secs(61),
        &mut no_upnp,
    );
    assert_eq!(gw.requests.len(), n + 1, "renewed at 60 s of a 120 s lease");
}

#[test]
fn upnp_is_used_when_neither_pcp_nor_nat_pmp_answers_and_deleted_on_stop() {
    let mut now = Instant::now();
    let mut gw = Gateway::new(false, false, now);
    let mut m = Mapper::new(cfg(true));
    let mut log = Vec::new();
    let mut upnp = |r: UpnpRequest| {
        log.push(r);
        Some(match r {
            UpnpRequest::Discover => UpnpReply::Found {
                device: IpAddr::V4(GW),
                external_ip: IpAddr::V4(EXT),
            },
            UpnpRequest::Add {
                external_port,
                lifetime,
                ..
            } => UpnpReply::Added {
                external_port,
                lifetime,
            },
            UpnpRequest::Delete { .. } => return None,
        })
    };
    m.start(now);
    let ev = run_for(&mut m, &mut gw, &mut now, Duration::from_secs(1), &mut upnp);
    assert_eq!(ev, vec![Event::Mapped(ext(PORT))]);
    assert_eq!(m.protocol(), Some(Protocol::Upnp));
    run_for(
        &mut m,
        &mut gw,
        &mut now,
        Duration::from_secs(3601),
        &mut upnp,
    );
    m.stop(now);
    let ev = exchange(&mut m, &mut gw, now, &mut upnp);
    assert_eq!(ev, vec![Event::Mapped(None)]);
    assert_eq!(
        log,
        vec![
            UpnpRequest::Discover,
            UpnpRequest::Add {
                internal_port: PORT,
                external_port: PORT,
                lifetime: 7200
            },
            UpnpRequest::Add {
                internal_port: PORT,
                external_port: PORT,
                lifetime: 7200
            },
            UpnpRequest::Delete {
                external_port: PORT
            },
        ]
    );
    assert_eq!(m.poll_timeout(), None);
}

#[test]
fn an_ssdp_answer_from_another_host_is_ignored() {
    let mut now = Instant::now();
    let mut gw = Gateway::new(false, false, now);
    let mut m = Mapper::new(cfg(true));
    let mut upnp = |r: UpnpRequest| match r {
        UpnpRequest::Discover => Some(UpnpReply::Found {
            device: "192.168.1.66".parse().unwrap_or_else(|_| unreachable!()),
            external_ip: IpAddr::V4(EXT),
        }),
        _ => panic!("no UPnP mapping may be asked of a device that is not the gateway"),
    };
    m.start(now);
    let ev = run_for(&mut m, &mut gw, &mut now, Duration::from_secs(5), &mut upnp);
    assert_eq!(ev, vec![Event::Ignored(IgnoreReason::UpnpElsewhere)]);
    assert_eq!(m.mapped(), None);
    assert!(!m.support().upnp);
}

#[test]
fn nothing_answering_means_no_mapping_and_a_recheck_in_ten_minutes() {
    let mut now = Instant::now();
    let mut gw = Gateway::new(false, false, now);
    gw.silent = true;
    let mut m = Mapper::new(cfg(false));
    m.start(now);
    let ev = run_for(&mut m, &mut gw, &mut now, PROBE_TIMEOUT, &mut no_upnp);
    assert!(ev.is_empty());
    assert!(m.probe_done());
    let n = gw.requests.len();
    assert!(n <= 6, "the probe is short: {n} datagrams");
    run_for(
        &mut m,
        &mut gw,
        &mut now,
        RECHECK - Duration::from_secs(1),
        &mut no_upnp,
    );
    assert_eq!(gw.requests.len(), n);
    gw.silent = false;
    gw.pmp = true;
    let ev = run_for(
        &mut m,
        &mut gw,
        &mut now,
        Duration::from_secs(2),
        &mut no_upnp,
    );
    assert_eq!(ev, vec![Event::Mapped(ext(60001))]);
}

#[test]
fn stop_deletes_a_pcp_and_a_nat_pmp_mapping_with_lifetime_zero() {
    for (pcp_on, len) in [(true, 60usize), (false, 12)] {
        let mut now = Instant::now();
        let mut gw = Gateway::new(pcp_on, true, now);
        let mut m = Mapper::new(cfg(false));
        m.start(now);
        run_for(
            &mut m,
            &mut gw,
            &mut now,
            Duration::from_secs(1),
            &mut no_upnp,
        );
        assert_eq!(gw.maps.len(), 1);
        m.stop(now);
        assert!(m.deleting());
        let ev = exchange(&mut m, &mut gw, now, &mut no_upnp);
        assert_eq!(ev, vec![Event::Mapped(None)]);
        assert!(gw.maps.is_empty(), "the gateway's mapping is gone");
        assert!(!m.deleting(), "the gateway confirmed the deletion");
        let last = gw.requests.last().cloned().unwrap_or_default();
        assert_eq!(last.len(), len);
        if pcp_on {
            assert_eq!(&last[4..8], &[0; 4], "PCP lifetime 0");
            assert_eq!(&last[24..36], &NONCE, "same nonce");
        } else {
            assert_eq!(&last[8..12], &[0; 4], "NAT-PMP lifetime 0");
        }
        // Nothing more is sent after a stop.
        run_for(
            &mut m,
            &mut gw,
            &mut now,
            Duration::from_secs(10_000),
            &mut no_upnp,
        );
        assert_eq!(m.poll_transmit(), None);
    }
}

#[test]
fn an_unconfirmed_deletion_is_retransmitted_for_at_most_a_second() {
    let mut now = Instant::now();
    let mut gw = Gateway::new(true, false, now);
    let mut m = Mapper::new(cfg(false));
    m.start(now);
    run_for(
        &mut m,
        &mut gw,
        &mut now,
        Duration::from_secs(1),
        &mut no_upnp,
    );
    gw.silent = true;
    let n = gw.requests.len();
    m.stop(now);
    run_for(
        &mut m,
        &mut gw,
        &mut now,
        Duration::from_secs(5),
        &mut no_upnp,
    );
    let deletes = gw.requests.len() - n;
    assert!((2..=4).contains(&deletes), "{deletes} deletions sent");
    assert!(!m.deleting());
    assert_eq!(m.poll_timeout(), None);
}

#[test]
fn a_gateway_restart_is_noticed_at_renewal_and_the_mapping_re_created() {
    let mut now = Instant::now();
    let mut gw = Gateway::new(true, true, now);
    gw.grant = 120;
    let mut m = Mapper::new(cfg(false));
    m.start(now);
    run_for(
        &mut m,
        &mut gw,
        &mut now,
        Duration::from_secs(1),
        &mut no_upnp,
    );
    assert_eq!(m.mapped(), ext(60001));
    now += Duration::from_secs(30);
    gw.restart(now);
    assert!(gw.maps.is_empty());
    let ev = run_for(
        &mut m,
        &mut gw,
        &mut now,
        Duration::from_secs(35),
        &mut no_upnp,
    );
    assert_eq!(
        ev,
        vec![
            Event::GatewayRestarted(Protocol::Pcp),
            Event::Mapped(ext(60009)),
        ]
    );
    assert_eq!(gw.maps.len(), 1, "re-created on the gateway");
}

#[test]
fn an_unanswered_renewal_loses_the_mapping_at_expiry_and_probes_again() {
    let mut now = Instant::now();
    let mut gw = Gateway::new(true, false, now);
    gw.grant = 120;
    let mut m = Mapper::new(cfg(false));
    m.start(now);
    run_for(
        &mut m,
        &mut gw,
        &mut now,
        Duration::from_secs(1),
        &mut no_upnp,
    );
    gw.silent = true;
    let t0 = now;
    let ev = run_until(
        &mut m,
        &mut gw,
        &mut now,
        t0 + Duration::from_secs(118),
        &mut no_upnp,
    );
    assert!(ev.is_empty(), "{ev:?}");
    let ev = run_until(
        &mut m,
        &mut gw,
        &mut now,
        t0 + Duration::from_secs(125),
        &mut no_upnp,
    );
    assert_eq!(ev, vec![Event::Mapped(None)]);
    gw.silent = false;
    let ev = run_for(
        &mut m,
        &mut gw,
        &mut now,
        RECHECK + Duration::from_secs(2),
        &mut no_upnp,
    );
    assert_eq!(ev, vec![Event::Mapped(ext(60001))]);
}

#[test]
fn a_refused_pcp_mapping_falls_back_to_nat_pmp() {
    let mut now = Instant::now();
    let mut gw = Gateway::new(true, true, now);
    let mut m = Mapper::new(cfg(false));
    m.start(now);
    // Answer the probe, then refuse the MAP by hand.
    let mut ev = Vec::new();
    while let Some(t) = m.poll_transmit() {
        if t.payload.len() == 60 {
            let refusal = pcp::encode_response(&pcp::Response {
                opcode: pcp::OP_MAP,
                result: pcp::ResultCode::NotAuthorized,
                lifetime: 30,
                epoch: 1000,
                map: Some(pcp::MapData {
                    nonce: NONCE,
                    protocol: 17,
                    internal_port: PORT,
                    external_port: 0,
                    external_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                }),
            });
            m.handle_datagram(now, gw_addr(), &refusal);
        } else if let Some(a) = gw.answer(now, &t.payload) {
            m.handle_datagram(now, gw_addr(), &a);
        }
    }
    ev.extend(run_for(
        &mut m,
        &mut gw,
        &mut now,
        Duration::from_secs(1),
        &mut no_upnp,
    ));
    assert_eq!(
        ev,
        vec![Event::Failed(Protocol::Pcp), Event::Mapped(ext(60001))]
    );
    assert_eq!(m.protocol(), Some(Protocol::Pmp));
}

/// Maps with PCP and returns the mapper in its steady state.
fn mapped_pcp(now: &mut Instant, gw: &mut Gateway) -> Mapper {
    let mut m = Mapper::new(cfg(false));
    m.start(*now);
    run_for(&mut m, gw, now, Duration::from_secs(1), &mut no_upnp);
    assert_eq!(m.mapped(), ext(60001));
    m
}

fn map_answer(nonce: pcp::Nonce, epoch: u32, ip: IpAddr, port: u16) -> Vec<u8> {
    pcp::encode_response(&pcp::Response {
        opcode: pcp::OP_MAP,
        result: pcp::ResultCode::Success,
        lifetime: 7200,
        epoch,
        map: Some(pcp::MapData {
            nonce,
            protocol: 17,
            internal_port: PORT,
            external_port: port,
            external_ip: ip,
        }),
    })
}

#[test]
fn hostile_answers_are_ignored_counted_and_change_nothing() {
    let mut now = Instant::now();
    let mut gw = Gateway::new(true, true, now);
    let mut m = mapped_pcp(&mut now, &mut gw);
    let epoch = gw.epoch(now);
    let evil: IpAddr = "203.0.113.66".parse().unwrap_or_else(|_| unreachable!());
    let cases: Vec<(SocketAddr, Vec<u8>, IgnoreReason)> = vec![
        (
            gw_addr(),
            map_answer([1; 12], epoch, evil, 9999),
            IgnoreReason::WrongNonce,
        ),
        (
            gw_addr(),
            map_answer(
                NONCE,
                epoch,
                "10.0.0.5".parse().unwrap_or_else(|_| unreachable!()),
                9999,
            ),
            IgnoreReason::PrivateExternal,
        ),
        (
            gw_addr(),
            map_answer(
                NONCE,
                epoch,
                "100.64.3.3".parse().unwrap_or_else(|_| unreachable!()),
                9999,
            ),
            IgnoreReason::PrivateExternal,
        ),
        (
            gw_addr(),
            map_answer(NONCE, epoch + 100_000, evil, 9999),
            IgnoreReason::WrongEpoch,
        ),
        (
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 66)), SERVER_PORT),
            map_answer(NONCE, epoch, evil, 9999),
            IgnoreReason::NotGateway,
        ),
        (
            SocketAddr::new(IpAddr::V4(GW), 5350),
            map_answer(NONCE, epoch, evil, 9999),
            IgnoreReason::NotGateway,
        ),
        (gw_addr(), vec![2, 0x81, 0, 0], IgnoreReason::Malformed),
        (gw_addr(), vec![9; 60], IgnoreReason::Malformed),
        (gw_addr(), vec![], IgnoreReason::Malformed),
        (
            gw_addr(),
            pmp::encode_response(&pmp::Response::MapUdp {
                result: pmp::ResultCode::Success,
                epoch,
                internal_port: PORT,
                external_port: 9999,
                lifetime: 7200,
            }),
            IgnoreReason::Unsolicited,
        ),
        (
            gw_addr(),
            pmp::encode_response(&pmp::Response::ExternalAddress {
                result: pmp::ResultCode::Success,
                epoch,
                external: Ipv4Addr::new(203, 0, 113, 66),
            }),
            IgnoreReason::Unsolicited,
        ),
    ];
    for (from, bytes, reason) in cases {
        m.handle_datagram(now, from, &bytes);
        let ev: Vec<_> = std::iter::from_fn(|| m.poll_event()).collect();
        assert_eq!(ev, vec![Event::Ignored(reason)], "{reason:?}");
        assert_eq!(m.mapped(), ext(60001), "{reason:?} changed the mapping");
        assert_eq!(m.poll_transmit(), None, "{reason:?} made us send");
    }
    // The genuine gateway still renews as before.
    let n = gw.requests.len();
    let ev = run_for(
        &mut m,
        &mut gw,
        &mut now,
        Duration::from_secs(3601),
        &mut no_upnp,
    );
    assert!(ev.is_empty(), "{ev:?}");
    assert_eq!(gw.requests.len(), n + 1);
}

#[test]
fn a_nat_pmp_gateway_behind_another_nat_is_not_used() {
    let mut now = Instant::now();
    let mut gw = Gateway::new(false, true, now);
    let mut m = Mapper::new(cfg(false));
    m.start(now);
    while let Some(t) = m.poll_transmit() {
        if t.payload == pmp::external_address_request() {
            let a = pmp::encode_response(&pmp::Response::ExternalAddress {
                result: pmp::ResultCode::Success,
                epoch: 5,
                external: Ipv4Addr::new(100, 64, 1, 2),
            });
            m.handle_datagram(now, gw_addr(), &a);
        }
    }
    let mut ev: Vec<_> = std::iter::from_fn(|| m.poll_event()).collect();
    gw.silent = true;
    ev.extend(run_for(
        &mut m,
        &mut gw,
        &mut now,
        Duration::from_secs(1),
        &mut no_upnp,
    ));
    assert_eq!(ev, vec![Event::Ignored(IgnoreReason::PrivateExternal)]);
    assert_eq!(m.support(), Support::default());
    assert_eq!(m.mapped(), None);
}

#[test]
fn epoch_rules_follow_rfc_6887_section_8_5() {
    let t = Instant::now();
    let prev = Some(Epoch {
        server: 1000,
        at: t,
    });
    let at = |s| t + Duration::from_secs(s);
    assert_eq!(check_epoch(None, 0, t), EpochVerdict::Fine);
    assert_eq!(check_epoch(prev, 1060, at(60)), EpochVerdict::Fine);
    assert_eq!(
        check_epoch(prev, 999, at(0)),
        EpochVerdict::Fine,
        "1 s slack"
    );
    assert_eq!(check_epoch(prev, 10, at(60)), EpochVerdict::Restarted);
    assert_eq!(
        check_epoch(prev, 1005, at(600)),
        EpochVerdict::Restarted,
        "fell behind"
    );
    assert_eq!(check_epoch(prev, 5000, at(60)), EpochVerdict::Ahead);
    assert_eq!(check_epoch(prev, u32::MAX, at(1)), EpochVerdict::Ahead);
}

proptest::proptest! {
    /// Whatever arrives, from wherever, at whatever time: no panic, and every transmit goes
    /// to the gateway's port 5351.
    #[test]
    fn arbitrary_input_never_panics_or_sends_elsewhere(
        inputs in proptest::collection::vec(
            (0u64..100_000, proptest::bool::ANY, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)),
            0..40,
        )
    ) {
        let mut now = Instant::now();
        let mut m = Mapper::new(cfg(true));
        m.start(now);
        for (dt, from_gw, mut bytes) in inputs {
            now += Duration::from_millis(dt);
            m.handle_timeout(now);
            if let (Some(b0), true) = (bytes.first_mut(), from_gw) {
                *b0 %= 3;
            }
            let from = if from_gw { gw_addr() } else { SocketAddr::new(IpAddr::V4(EXT), 5351) };
            m.handle_datagram(now, from, &bytes);
            while let Some(t) = m.poll_transmit() {
                proptest::prop_assert_eq!(t.dst, gw_addr());
            }
            while m.poll_upnp().is_some() {}
            while m.poll_event().is_some() {}
        }
    }
}
