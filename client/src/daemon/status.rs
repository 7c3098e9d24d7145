//! `meshpunch status`: the snapshot rendered from the node's state and the driver's counters.

use std::sync::atomic::Ordering;

use meshpunch_proto::path::{PathKind, ProbeCounters, DATA_SOCKET};

use super::Engine;
use crate::control::{BirthdayTotals, MtuStatus, PeerStatus, RelayStatus, Status, TunStatus};
use crate::keys::format_key;

impl Engine {
    pub(super) fn status(&self) -> Status {
        let node = &self.node;
        let mut probes = ProbeCounters {
            unauthenticated: node.unknown_probes(),
            ..ProbeCounters::default()
        };
        let mut birthday = BirthdayTotals {
            mapping: node.mapping(),
            pool_open: self.pool.open_count(),
            pool_opened_total: self.pool.opened_total,
            ..BirthdayTotals::default()
        };
        let peers = self
            .peers
            .iter()
            .zip(node.peers())
            .enumerate()
            .filter(|(_, (_, np))| !np.is_removed())
            .map(|(i, (p, np))| {
                let path = np.path();
                let st = path.status();
                let c = path.counters();
                let t = np.traffic();
                probes.accepted += c.accepted;
                probes.unauthenticated += c.unauthenticated;
                probes.replayed += c.replayed;
                probes.refused_candidates += c.refused_candidates;
                let reason = match (np.note(), st.kind) {
                    (Some(n), PathKind::None) => n.to_string(),
                    _ => st.reason.clone(),
                };
                birthday.spray_sent += st.birthday.spray_sent;
                birthday.spray_hits += st.birthday.spray_hits;
                birthday.found += st.birthday.found;
                birthday.low_ttl_pings += st.birthday.low_ttl_pings;
                let local_socket = st.remote.map_or(DATA_SOCKET, |r| r.local);
                let local_port = match local_socket {
                    DATA_SOCKET => Some(self.data_addr.port()),
                    l => self.pool.local_port(l),
                };
                PeerStatus {
                    public_key: p.b64.clone(),
                    name: p.name.clone(),
                    proxy: p.wg.status_addr(),
                    path_changes: p.changes.total,
                    failovers: p.changes.failovers,
                    allowed_ips: p
                        .wg
                        .device()
                        .map(|d| d.allowed_ips(i).iter().map(|n| n.to_string()).collect())
                        .unwrap_or_default(),
                    path: st.kind,
                    relay_transport: (st.kind == PathKind::Relay)
                        .then(|| {
                            node.relay_link()
                                .map(|l| l.transport().as_str().to_string())
                        })
                        .flatten(),
                    remote: st.remote_label.clone(),
                    rtt_ms: st.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    tx_bytes: t.tx_bytes + p.fast.tx_bytes.load(Ordering::Relaxed),
                    rx_bytes: t.rx_bytes,
                    relay_tx_bytes: t.relay_tx_bytes,
                    relay_rx_bytes: t.relay_rx_bytes,
                    tx_packets: t.tx_packets + p.fast.tx_packets.load(Ordering::Relaxed),
                    proxy_refused: p.fast.refused.load(Ordering::Relaxed),
                    rx_packets: t.rx_packets,
                    dropped_no_path: t.dropped,
                    reason,
                    session: path.has_session(),
                    direct_blocked: path.direct_blocked(),
                    local_socket,
                    local_port,
                    birthday: st.birthday,
                    pairs: st.pairs,
                    mtu: st.mtu,
                }
            })
            .collect();
        Status {
            public_key: format_key(&self.id.public),
            nat: self.lifetime.status(),
            data_addr: self.data_addr,
            public_addr: node.server_reflexive().addr(),
            public_addr_source: node
                .server_reflexive()
                .source()
                .map(|s| s.as_str().to_string()),
            rendezvous: {
                let mut r = self.rdv.clone();
                if let Some(q) = &self.quic {
                    let st = q.stats();
                    r.quic_rx = st.rx;
                    r.quic_rx_dropped = st.rx_dropped;
                }
                r
            },
            home_relay: node.relay_link().map(|l| RelayStatus {
                region: l.region().to_string(),
                server: l.server(),
                relayed: l.relayed_addr(),
                state: l.state().as_str().to_string(),
                error: l.error().map(str::to_string),
                transport: l.transport().as_str().to_string(),
                url: l.url().to_string(),
                stream_dropped: self.streams.dropped.load(Ordering::Relaxed),
            }),
            relays: node.relay_latencies(),
            probes,
            birthday,
            portmap: self.portmap.as_ref().map(|p| p.status()),
            peers,
            wg_interface: self
                .wg_interface
                .as_ref()
                .and_then(|w| w.lock().ok().map(|s| s.clone())),
            config_reloads: self.reloads,
            tun: self.device.as_ref().map(|d| &d.dev).map(|d| {
                let s = &d.stats;
                let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                TunStatus {
                    name: d.name().to_string(),
                    tx_packets: n(&s.tx_packets),
                    tx_bytes: n(&s.tx_bytes),
                    rx_packets: n(&s.rx_packets),
                    rx_bytes: n(&s.rx_bytes),
                    no_peer: n(&s.no_peer),
                    decrypt_failed: n(&s.decrypt_failed),
                    bad_source: n(&s.bad_source),
                    write_failed: n(&s.write_failed),
                    mtu: d.mtu(),
                    configured_mtu: d.configured_mtu(),
                }
            }),
            mtu: MtuStatus {
                path: node.mtu(),
                recommended: recommended_mtu(node.mtu()),
                changes: self.mtu.changes,
                error: self.mtu.error.clone(),
                send_too_big: super::SEND_TOO_BIG.load(Ordering::Relaxed),
            },
        }
    }
}

/// The WireGuard interface MTU to recommend: the measured path's tunnel MTU (never above the
/// static recommendation, [`crate::tun::DEFAULT_MTU`], which fits every path on a 1500-byte
/// link), or that recommendation while nothing is measured.
pub(super) fn recommended_mtu(path: Option<u16>) -> u16 {
    let default = crate::tun::DEFAULT_MTU as u16;
    path.map_or(default, |p| p.min(default))
}
