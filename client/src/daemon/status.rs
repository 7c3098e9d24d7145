//! `meshpunch status`: the snapshot the engine renders from its state machines.

use std::sync::atomic::Ordering;

use meshpunch_proto::path::{PathKind, ProbeCounters, DATA_SOCKET};

use super::Engine;
use crate::control::{BirthdayTotals, PeerStatus, RelayStatus, Status};
use crate::keys::format_key;

impl Engine {
    pub(super) fn status(&self) -> Status {
        let mut probes = ProbeCounters {
            unauthenticated: self.unknown_probes,
            ..ProbeCounters::default()
        };
        let mut birthday = BirthdayTotals {
            mapping: self.stun_mappings.behaviour(),
            pool_open: self.pool.open_count(),
            pool_opened_total: self.pool.opened_total,
            ..BirthdayTotals::default()
        };
        let peers = self
            .peers
            .iter()
            .map(|p| {
                let st = p.path.status();
                let c = p.path.counters();
                probes.accepted += c.accepted;
                probes.unauthenticated += c.unauthenticated;
                probes.replayed += c.replayed;
                probes.refused_candidates += c.refused_candidates;
                let reason = match (&p.note, st.kind) {
                    (Some(n), PathKind::None) => n.clone(),
                    _ => st.reason.clone(),
                };
                birthday.spray_sent += st.birthday.spray_sent;
                birthday.spray_hits += st.birthday.spray_hits;
                birthday.found += st.birthday.found;
                let local_socket = st.remote.map_or(DATA_SOCKET, |r| r.local);
                let local_port = match local_socket {
                    DATA_SOCKET => Some(self.data_addr.port()),
                    l => self.pool.local_port(l),
                };
                PeerStatus {
                    public_key: p.b64.clone(),
                    name: p.name.clone(),
                    proxy: p.wg.status_addr(),
                    path: st.kind,
                    remote: st.remote_label.clone(),
                    rtt_ms: st.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    tx_bytes: p.tx_bytes + p.fast.tx_bytes.load(Ordering::Relaxed),
                    rx_bytes: p.rx_bytes,
                    tx_packets: p.tx_packets + p.fast.tx_packets.load(Ordering::Relaxed),
                    proxy_refused: p.fast.refused.load(Ordering::Relaxed),
                    rx_packets: p.rx_packets,
                    dropped_no_path: p.dropped,
                    reason,
                    session: p.path.has_session(),
                    direct_blocked: p.path.direct_blocked(),
                    local_socket,
                    local_port,
                    birthday: st.birthday,
                    pairs: st.pairs,
                }
            })
            .collect();
        Status {
            public_key: format_key(&self.id.public),
            nat: self.lifetime.status(),
            data_addr: self.data_addr,
            public_addr: self.srflx.addr(),
            public_addr_source: self.srflx.source().map(|s| s.as_str().to_string()),
            rendezvous: {
                let mut r = self.rdv.clone();
                if let Some(q) = &self.quic {
                    let st = q.stats();
                    r.quic_rx = st.rx;
                    r.quic_rx_dropped = st.rx_dropped;
                }
                r
            },
            home_relay: self.turn.as_ref().map(|t| RelayStatus {
                region: t.region.clone(),
                server: t.server,
                relayed: t.client.relayed_addr(),
                state: t.state.clone(),
                error: t.error.clone(),
            }),
            relays: self.relay_latencies(),
            probes,
            birthday,
            peers,
        }
    }
}
