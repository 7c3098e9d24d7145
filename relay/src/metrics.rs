//! Metric names (one home for each) and the export of per-worker counters.
//!
//! Workers count in plain integers inside their [`meshpunch_proto::turn::Stats`] (no atomics on
//! the hot path) and add the deltas to the global `metrics` registry about once a second.

use meshpunch_proto::turn::{Gauges, Stats, DENY_LABELS};
use metrics::{counter, gauge};

use crate::udp::SendStats;

/// Live allocations (gauge).
pub const ALLOCATIONS: &str = "meshpunch_relay_allocations";
/// Live permissions (gauge).
pub const PERMISSIONS: &str = "meshpunch_relay_permissions";
/// Live channel bindings (gauge).
pub const CHANNELS: &str = "meshpunch_relay_channels";
/// Allocations created.
pub const ALLOCATIONS_CREATED: &str = "meshpunch_relay_allocations_created_total";
/// Allocations ended, label `reason` = `expired` | `released`.
pub const ALLOCATIONS_ENDED: &str = "meshpunch_relay_allocations_ended_total";
/// Permissions created.
pub const PERMISSIONS_CREATED: &str = "meshpunch_relay_permissions_created_total";
/// Channels bound.
pub const CHANNELS_BOUND: &str = "meshpunch_relay_channels_bound_total";
/// Relayed packets, label `direction` = `to_peer` | `to_client`.
pub const PACKETS: &str = "meshpunch_relay_packets_total";
/// Relayed payload bytes, label `direction`.
pub const BYTES: &str = "meshpunch_relay_bytes_total";
/// Peer addresses refused (403), label `reason` (address class, `relay_self` or `denied`).
pub const DENIED: &str = "meshpunch_relay_peer_denied_total";
/// Requests with bad credentials (401 after an integrity check, 441).
pub const AUTH_FAILURES: &str = "meshpunch_relay_auth_failures_total";
/// 401 challenges sent to requests without credentials.
pub const CHALLENGES: &str = "meshpunch_relay_challenges_total";
/// 438 Stale Nonce answers.
pub const STALE_NONCES: &str = "meshpunch_relay_stale_nonces_total";
/// Quota hits, label `kind` = `user` (486, the username's) | `network` (486, the network's) |
/// `capacity` (508).
pub const QUOTA_HITS: &str = "meshpunch_relay_quota_hits_total";
/// Datagrams dropped, label `reason` = `rate_limited` | `malformed` | `no_permission` |
/// `unbound_channel` | `bandwidth` (per allocation) | `network_bandwidth` | `send_failed`.
pub const DROPPED: &str = "meshpunch_relay_dropped_total";
/// Other error responses (400, 420, 437, 440, 442, 443).
pub const ERRORS: &str = "meshpunch_relay_error_responses_total";
/// Binding requests answered.
pub const BINDINGS: &str = "meshpunch_relay_bindings_total";
/// `sendmmsg`/`sendto` calls.
pub const SEND_SYSCALLS: &str = "meshpunch_relay_send_syscalls_total";
/// 1 while draining after SIGTERM.
pub const DRAINING: &str = "meshpunch_relay_draining";
/// Admin HTTP connections closed early, label `reason` = `too_many_connections` (closed on
/// accept) | `header_timeout` (request head not received in time).
pub const ADMIN_REFUSED: &str = "meshpunch_relay_admin_refused_total";
/// Admin HTTP connections open (gauge).
pub const ADMIN_CONNECTIONS_OPEN: &str = "meshpunch_relay_admin_connections_open";
/// Relayed ports in use over all relay IPs (gauge).
pub const PORTS_IN_USE: &str = "meshpunch_relay_ports_in_use";
/// Relayed ports available in total (gauge): the capacity limit.
pub const PORTS_CAPACITY: &str = "meshpunch_relay_ports_capacity";

/// TCP + TLS connections open, by `transport` (`tcp`, `tls`).
pub const STREAM_CONNECTIONS_OPEN: &str = "meshpunch_relay_stream_connections_open";
/// TCP + TLS connections accepted, by `transport`.
pub const STREAM_CONNECTIONS: &str = "meshpunch_relay_stream_connections_total";
/// Connections closed at once because `stream_max_connections` were open, by `transport`.
pub const STREAM_REJECTED: &str = "meshpunch_relay_stream_rejected_total";
/// Connections closed for a framing error (bad first byte, bad STUN header, a message past
/// the limit), by `transport`.
pub const STREAM_FRAMING_ERRORS: &str = "meshpunch_relay_stream_framing_errors_total";
/// Connections closed by a timeout, by `transport` and `phase` (`first_message`: no whole
/// message in time; `stalled`: a message half-sent; `idle`: nothing for a long time).
pub const STREAM_TIMEOUTS: &str = "meshpunch_relay_stream_timeouts_total";
/// TLS handshakes that failed, by `transport` and `reason` (`error`, `timeout`, `busy`: too
/// many at once).
pub const STREAM_HANDSHAKE_FAILURES: &str = "meshpunch_relay_stream_handshake_failures_total";
/// Messages to a client dropped because its write queue was full, by `transport`.
pub const STREAM_DROPPED: &str = "meshpunch_relay_stream_dropped_total";
/// Messages over streams, by `transport` and `direction` (`in` from clients, `out` to them).
pub const STREAM_PACKETS: &str = "meshpunch_relay_stream_packets_total";
/// Bytes of those messages, by `transport` and `direction`.
pub const STREAM_BYTES: &str = "meshpunch_relay_stream_bytes_total";

/// What one worker exported last time (to compute deltas).
#[derive(Debug, Default, Clone)]
pub struct Exported {
    stats: Stats,
    gauges: Gauges,
    send: SendStats,
}

fn d(new: u64, old: u64) -> u64 {
    new.saturating_sub(old)
}

impl Exported {
    /// Adds what changed since the last call to the global registry.
    pub fn export(&mut self, s: &Stats, g: Gauges, send: SendStats) {
        let o = &self.stats;
        counter!(ALLOCATIONS_CREATED).increment(d(s.allocations_created, o.allocations_created));
        counter!(ALLOCATIONS_ENDED, "reason" => "expired")
            .increment(d(s.allocations_expired, o.allocations_expired));
        counter!(ALLOCATIONS_ENDED, "reason" => "released")
            .increment(d(s.allocations_released, o.allocations_released));
        counter!(PERMISSIONS_CREATED).increment(d(s.permissions_created, o.permissions_created));
        counter!(CHANNELS_BOUND).increment(d(s.channels_bound, o.channels_bound));
        counter!(PACKETS, "direction" => "to_peer")
            .increment(d(s.packets_to_peer, o.packets_to_peer));
        counter!(PACKETS, "direction" => "to_client")
            .increment(d(s.packets_to_client, o.packets_to_client));
        counter!(BYTES, "direction" => "to_peer").increment(d(s.bytes_to_peer, o.bytes_to_peer));
        counter!(BYTES, "direction" => "to_client")
            .increment(d(s.bytes_to_client, o.bytes_to_client));
        for (i, label) in DENY_LABELS.iter().enumerate() {
            let delta = d(s.denied[i], o.denied[i]);
            if delta > 0 {
                counter!(DENIED, "reason" => *label).increment(delta);
            }
        }
        counter!(AUTH_FAILURES).increment(d(s.auth_failures, o.auth_failures));
        counter!(CHALLENGES).increment(d(s.challenges, o.challenges));
        counter!(STALE_NONCES).increment(d(s.stale_nonces, o.stale_nonces));
        counter!(QUOTA_HITS, "kind" => "user").increment(d(s.quota_hits, o.quota_hits));
        counter!(QUOTA_HITS, "kind" => "network")
            .increment(d(s.network_quota_hits, o.network_quota_hits));
        counter!(QUOTA_HITS, "kind" => "capacity").increment(d(s.capacity_hits, o.capacity_hits));
        for (label, new, old) in [
            ("rate_limited", s.rate_limited, o.rate_limited),
            ("malformed", s.malformed, o.malformed),
            ("no_permission", s.no_permission, o.no_permission),
            ("unbound_channel", s.unbound_channel, o.unbound_channel),
            ("bandwidth", s.bandwidth_dropped, o.bandwidth_dropped),
            (
                "network_bandwidth",
                s.network_bandwidth_dropped,
                o.network_bandwidth_dropped,
            ),
            ("send_failed", send.dropped, self.send.dropped),
        ] {
            counter!(DROPPED, "reason" => label).increment(d(new, old));
        }
        counter!(ERRORS).increment(d(s.errors, o.errors));
        counter!(BINDINGS).increment(d(s.bindings, o.bindings));
        counter!(SEND_SYSCALLS).increment(d(send.syscalls, self.send.syscalls));
        let og = self.gauges;
        gauge!(ALLOCATIONS).increment(g.allocations as f64 - og.allocations as f64);
        gauge!(PERMISSIONS).increment(g.permissions as f64 - og.permissions as f64);
        gauge!(CHANNELS).increment(g.channels as f64 - og.channels as f64);
        self.stats = s.clone();
        self.gauges = g;
        self.send = send;
    }
}
