//! Glue between the rendezvous client library ([`crate::rendezvous`]) and the daemon's engine:
//! one task that keeps a rendezvous client, answers incoming offers with our current
//! candidates, makes offers on request, and turns everything into [`SignalEvent`]s.
//!
//! The engine never waits on the rendezvous: when it is down, working paths keep working and
//! only new offers wait.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshpunch_proto::connect::ConnectString;
use meshpunch_proto::path::{Candidate, CandidateKind};
use meshpunch_proto::wire::{self, ErrorCode, PeerKey, RelayRegion};
use tokio::sync::{mpsc, watch};

use crate::rendezvous::{AuthFailure, Client, ClientConfig, ClientError, Event, Punch, AUTH_RETRY};

/// What the rendezvous side tells the engine.
#[derive(Debug)]
pub enum SignalEvent {
    /// (Re)registered.
    Registered {
        /// Our address as the rendezvous saw it (the connection's socket).
        observed: SocketAddr,
        /// STUN servers to use from the data socket.
        stun: Vec<SocketAddr>,
        /// Relay regions with TURN credentials.
        relays: Vec<RelayRegion>,
        /// The QUIC connection runs on the daemon's data socket (so `observed` is the data
        /// socket's mapping).
        shared_socket: bool,
        /// Local address of the socket the connection runs on.
        local: Option<SocketAddr>,
        /// QUIC, or TLS over TCP where UDP is blocked (then `shared_socket` is false and
        /// `observed` is a TCP mapping: never a UDP candidate). `status` shows it as
        /// `rendezvous.transport`.
        transport: crate::rendezvous::Transport,
    },
    /// The first connection attempt (or a reconnect cycle) failed.
    ConnectFailed {
        /// Why.
        reason: String,
    },
    /// Lost the connection; reconnecting.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// Fresh relay credentials.
    Relays(Vec<RelayRegion>),
    /// The rendezvous saw us from a new address: our mapping may have changed.
    ObservedChanged(SocketAddr),
    /// A watched peer came or went.
    Presence {
        /// Peer key.
        key: [u8; 32],
        /// Online now.
        online: bool,
    },
    /// Punch now: candidates of the peer, the session secret and the start time.
    Punch {
        /// Peer key.
        peer: [u8; 32],
        /// Peer candidates.
        candidates: Vec<Candidate>,
        /// Session secret.
        secret: [u8; 32],
        /// When to start probing.
        start_at: Instant,
        /// Version of our candidates that the peer received.
        local_version: u64,
        /// The peer's address as the rendezvous observed it (the only birthday target IP).
        peer_observed: Option<SocketAddr>,
    },
    /// The rendezvous refused our token (expired, revoked, …): no fast retries until a new
    /// token arrives (SIGHUP) or the slow retry ([`AUTH_RETRY`]) runs.
    Unauthorized(AuthFailure),
    /// Our offer failed.
    OfferFailed {
        /// Peer key.
        peer: [u8; 32],
        /// Why (shown in status).
        reason: String,
    },
}

/// What the engine asks of the rendezvous side.
#[derive(Debug)]
pub enum SignalCmd {
    /// Offer our current candidates to this peer.
    Offer([u8; 32]),
    /// Use this connect string from now on (SIGHUP re-read the config: a rotated token).
    Reload(Box<ConnectString>),
    /// The peers changed (added to / removed from the WireGuard interface): watch their
    /// presence and accept offers from exactly these.
    SetPeers(Vec<[u8; 32]>),
}

/// Logs a token refusal at ERROR once per distinct (reason, token); repeats go to debug.
fn log_auth_failure(f: &AuthFailure, token: &str, last: &mut Option<String>) {
    let key = format!(
        "{:?} {}",
        f.reason,
        meshpunch_proto::token::token_hash(token)
    );
    if last.as_deref() == Some(key.as_str()) {
        tracing::debug!(reason = ?f.reason, "rendezvous still refuses the token");
        return;
    }
    *last = Some(key);
    tracing::error!(
        network = f.network.as_deref().unwrap_or("?"),
        reason = f.reason.map_or("unauthorized", |r| r.as_str()),
        "{}; put a new token in the config and send SIGHUP (retrying every {} min meanwhile)",
        f.describe(),
        AUTH_RETRY.as_secs() / 60
    );
}

/// Converts a candidate from the wire.
pub fn from_wire(c: &wire::Candidate) -> Option<Candidate> {
    let kind = match c.kind {
        wire::CandidateKind::Host => CandidateKind::Host,
        wire::CandidateKind::ServerReflexive => CandidateKind::Srflx,
        wire::CandidateKind::Predicted => CandidateKind::Predicted,
        wire::CandidateKind::Relayed => CandidateKind::Relayed,
        wire::CandidateKind::ServerReflexiveDependent => CandidateKind::SrflxDependent,
        wire::CandidateKind::PortMapped => CandidateKind::Portmap,
        wire::CandidateKind::Other(_) => return None,
    };
    Some(Candidate { kind, addr: c.addr })
}

/// Converts a candidate to the wire, with an ICE-like priority (host > srflx > relayed).
pub fn to_wire(c: &Candidate) -> wire::Candidate {
    let (kind, priority) = match c.kind {
        CandidateKind::Host => (wire::CandidateKind::Host, 126),
        CandidateKind::Srflx | CandidateKind::Prflx | CandidateKind::Birthday => {
            (wire::CandidateKind::ServerReflexive, 100)
        }
        CandidateKind::SrflxDependent => (wire::CandidateKind::ServerReflexiveDependent, 99),
        // Above server-reflexive: a mapping works from any peer, a symmetric NAT's srflx not.
        CandidateKind::Portmap => (wire::CandidateKind::PortMapped, 110),
        CandidateKind::Predicted => (wire::CandidateKind::Predicted, 50),
        CandidateKind::Relayed => (wire::CandidateKind::Relayed, 0),
    };
    wire::Candidate {
        addr: c.addr,
        kind,
        priority,
    }
}

/// A status-friendly reason for a failed offer.
fn offer_error(e: &ClientError) -> String {
    match e {
        ClientError::Server {
            code: ErrorCode::NotFound,
            ..
        } => "peer is not connected to the rendezvous (offline, or not in this network)".into(),
        ClientError::Server {
            code: ErrorCode::Unauthorized,
            message,
            ..
        } => format!("rendezvous refused: {message}"),
        ClientError::Timeout => "the peer did not answer the offer in time".into(),
        e => e.to_string(),
    }
}

/// Our current candidates (and their version) for an offer or answer.
fn snapshot(local: &watch::Receiver<(u64, Vec<Candidate>)>) -> (u64, Vec<wire::Candidate>) {
    let l = local.borrow();
    (l.0, l.1.iter().map(to_wire).collect())
}

fn punch_event(p: Punch, local_version: u64) -> SignalEvent {
    SignalEvent::Punch {
        local_version,
        peer: p.peer.0,
        candidates: p.peer_candidates.iter().filter_map(from_wire).collect(),
        secret: p.session_secret,
        start_at: p.start_at.into_std(),
        peer_observed: p.peer_observed,
    }
}

/// Starts the rendezvous task. `local` always holds our current candidates and their version
/// (bumped on every change), which each [`SignalEvent::Punch`] reports back.
pub fn spawn(
    connect: ConnectString,
    private_key: [u8; 32],
    peers: Vec<[u8; 32]>,
    local: watch::Receiver<(u64, Vec<Candidate>)>,
    events: mpsc::Sender<SignalEvent>,
) -> mpsc::Sender<SignalCmd> {
    spawn_with(connect, private_key, peers, local, events, None, Vec::new())
}

/// [`spawn`], with every QUIC connection on `endpoint` (the daemon's one endpoint over its
/// shared data socket, see [`crate::shared_socket`]); `None`: sockets of the client's own.
/// `ca_roots`: extra CAs trusted for the rendezvous certificate (`--ca-file`).
pub fn spawn_with(
    connect: ConnectString,
    private_key: [u8; 32],
    peers: Vec<[u8; 32]>,
    local: watch::Receiver<(u64, Vec<Candidate>)>,
    events: mpsc::Sender<SignalEvent>,
    endpoint: Option<quinn::Endpoint>,
    ca_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> mpsc::Sender<SignalCmd> {
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<SignalCmd>(256);
    tokio::spawn(async move {
        let mut peers = peers;
        let mut connect = connect;
        let mut backoff = Duration::from_millis(250);
        let mut last_auth_log: Option<String> = None;
        loop {
            let mut cfg = ClientConfig::new(
                connect.clone(),
                x25519_dalek::StaticSecret::from(private_key),
            );
            // The same endpoint for every client this task makes (one endpoint per socket).
            cfg.endpoint = endpoint.clone();
            cfg.ca_roots = ca_roots.clone();
            let (client, mut evs) = match Client::connect(cfg).await {
                Ok(x) => x,
                Err(e) => {
                    let auth = match &e {
                        ClientError::Server {
                            code: ErrorCode::Unauthorized,
                            message,
                            reason,
                        } => Some(AuthFailure::from_refusal(
                            *reason,
                            message.clone(),
                            &connect.token,
                        )),
                        _ => None,
                    };
                    let sent = match &auth {
                        Some(f) => {
                            log_auth_failure(f, &connect.token, &mut last_auth_log);
                            events.send(SignalEvent::Unauthorized(f.clone())).await
                        }
                        None => {
                            events
                                .send(SignalEvent::ConnectFailed {
                                    reason: e.to_string(),
                                })
                                .await
                        }
                    };
                    if sent.is_err() {
                        return;
                    }
                    // A refused token is not retried every few seconds: wait for a reload.
                    let wait = match &auth {
                        Some(f) if f.is_permanent() => AUTH_RETRY,
                        _ => {
                            let jitter =
                                rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1);
                            let w = backoff + Duration::from_millis(jitter);
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                            w
                        }
                    };
                    let deadline = tokio::time::Instant::now() + wait;
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep_until(deadline) => break,
                            cmd = cmd_rx.recv() => match cmd {
                                // Offers asked for while down fail at once.
                                Some(SignalCmd::Offer(peer)) => {
                                    let _ = events
                                        .send(SignalEvent::OfferFailed {
                                            peer,
                                            reason: format!("rendezvous unreachable: {e}"),
                                        })
                                        .await;
                                }
                                Some(SignalCmd::SetPeers(p)) => peers = p,
                                Some(SignalCmd::Reload(cs)) => {
                                    tracing::info!("rendezvous connect string reloaded; reconnecting");
                                    connect = *cs;
                                    backoff = Duration::from_millis(250);
                                    break;
                                }
                                None => return,
                            },
                        }
                    }
                    continue;
                }
            };
            backoff = Duration::from_millis(250);
            // The first registration arrives as Event::Registered like every later one.
            let keys: Vec<PeerKey> = peers.iter().map(|k| PeerKey(*k)).collect();
            if let Err(e) = client.watch(keys).await {
                tracing::warn!(error = %e, "rendezvous watch failed");
            }
            loop {
                tokio::select! {
                    ev = evs.recv() => {
                        let Some(ev) = ev else { break };
                        let out = match ev {
                            Event::Registered(r) => Some(SignalEvent::Registered {
                                observed: r.observed,
                                stun: r.stun.clone(),
                                relays: r.relays.clone(),
                                shared_socket: r.shared_socket,
                                local: r.local,
                                transport: r.transport,
                            }),
                            Event::Disconnected { reason } => Some(SignalEvent::Disconnected { reason }),
                            Event::ObservedAddr(a) => Some(SignalEvent::ObservedChanged(a)),
                            Event::RelayUpdate(r) => Some(SignalEvent::Relays(r)),
                            Event::Presence { key, online } => Some(SignalEvent::Presence { key: key.0, online }),
                            Event::IncomingOffer(o) => {
                                let from = o.from.0;
                                if !peers.contains(&from) {
                                    tracing::info!(peer = %o.from, "offer from a peer not in our config ignored");
                                    None
                                } else {
                                    let (version, cands) = snapshot(&local);
                                    let events = events.clone();
                                    tokio::spawn(async move {
                                        let ev = match o.answer(cands).await {
                                            Ok(p) => punch_event(p, version),
                                            Err(e) => SignalEvent::OfferFailed { peer: from, reason: format!("answer failed: {e}") },
                                        };
                                        let _ = events.send(ev).await;
                                    });
                                    None
                                }
                            }
                            Event::Unauthorized(f) => {
                                log_auth_failure(&f, &connect.token, &mut last_auth_log);
                                Some(SignalEvent::Unauthorized(f))
                            }
                            Event::Superseded => {
                                let _ = events.send(SignalEvent::Disconnected {
                                    reason: "another daemon registered the same key; this one stopped using the rendezvous".into(),
                                }).await;
                                return;
                            }
                        };
                        if let Some(out) = out {
                            if events.send(out).await.is_err() {
                                client.close();
                                return;
                            }
                        }
                    }
                    cmd = cmd_rx.recv() => {
                        let peer = match cmd {
                            Some(SignalCmd::Offer(peer)) => peer,
                            Some(SignalCmd::SetPeers(p)) => {
                                peers = p;
                                let keys: Vec<PeerKey> = peers.iter().map(|k| PeerKey(*k)).collect();
                                if let Err(e) = client.watch(keys).await {
                                    tracing::warn!(error = %e, "rendezvous watch failed");
                                }
                                continue;
                            }
                            Some(SignalCmd::Reload(cs)) => {
                                connect = (*cs).clone();
                                if client.reload(*cs).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            None => {
                                client.close();
                                return;
                            }
                        };
                        let (version, cands) = snapshot(&local);
                        let client = client.clone();
                        let events = events.clone();
                        tokio::spawn(async move {
                            let ev = match client.offer(PeerKey(peer), cands).await {
                                Ok(p) => punch_event(p, version),
                                Err(e) => SignalEvent::OfferFailed { peer, reason: offer_error(&e) },
                            };
                            let _ = events.send(ev).await;
                        });
                    }
                }
            }
        }
    });
    cmd_tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependent_srflx_maps_both_ways_and_unknown_kinds_are_ignored() {
        let addr: SocketAddr = "198.51.100.1:4000".parse().unwrap();
        let c = Candidate {
            kind: CandidateKind::SrflxDependent,
            addr,
        };
        let w = to_wire(&c);
        assert_eq!(u8::from(w.kind), 4);
        assert_eq!(from_wire(&w), Some(c));
        // Pairs found by birthday probing are never signalled as such.
        let b = to_wire(&Candidate {
            kind: CandidateKind::Birthday,
            addr,
        });
        assert_eq!(b.kind, wire::CandidateKind::ServerReflexive);
        let unknown = wire::Candidate {
            addr,
            kind: wire::CandidateKind::from(200),
            priority: 1,
        };
        assert_eq!(from_wire(&unknown), None);
    }

    #[test]
    fn port_mapped_candidates_keep_their_kind_and_must_be_public() {
        let addr: SocketAddr = "198.51.100.2:60001".parse().unwrap();
        let c = Candidate {
            kind: CandidateKind::Portmap,
            addr,
        };
        let w = to_wire(&c);
        assert_eq!(u8::from(w.kind), 5);
        assert!(
            w.priority
                > to_wire(&Candidate {
                    kind: CandidateKind::Srflx,
                    addr
                })
                .priority
        );
        assert_eq!(from_wire(&w), Some(c));
        assert!(meshpunch_proto::path::candidate_allowed(&c, false));
        for bad in [
            "192.168.1.10:5000",
            "100.64.0.1:5000",
            "127.0.0.1:5000",
            "198.51.100.2:0",
        ] {
            let c = Candidate {
                kind: CandidateKind::Portmap,
                addr: bad.parse().unwrap(),
            };
            assert!(
                !meshpunch_proto::path::candidate_allowed(&c, false),
                "{bad}"
            );
        }
    }
}
