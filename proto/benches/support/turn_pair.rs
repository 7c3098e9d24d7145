//! A TURN server core and client wired together in memory (no sockets): one allocation with
//! a channel bound to a loopback peer, ready for forwarding benchmarks.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use meshpunch_proto::creds::rest_credentials;
use meshpunch_proto::turn::{
    Auth, ClientAction, PortPool, ServerConfig, TurnServer, DEFAULT_NETWORK_BANDWIDTH,
    DEFAULT_NETWORK_QUOTA,
};
use meshpunch_proto::turn_client::{TurnClient, TurnCredentials, TurnEvent};

/// Server, addresses and the channel the client bound.
pub struct TurnPair {
    pub server: TurnServer<PortPool>,
    pub client_addr: SocketAddr,
    pub peer: SocketAddr,
    pub relayed: SocketAddr,
    pub channel: u16,
    pub now: Instant,
}

/// Builds the pair and runs Allocate + ChannelBind to completion.
pub fn turn_pair() -> TurnPair {
    let now = Instant::now();
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut cfg = ServerConfig::new(
        "bench",
        Auth {
            secrets: vec![b"bench-secret".to_vec()],
            ..Auth::default()
        },
        [7; 32],
    );
    cfg.policy.allow_loopback = true;
    // Production limits: the default per-allocation bucket (from ServerConfig::new) and a
    // per-network bucket shared like across workers, so the hot path measured is the real one.
    let pool = PortPool::new(vec!["127.0.0.1".parse().unwrap()], 50_000, 50_100, 0)
        .with_network_limits(DEFAULT_NETWORK_QUOTA, DEFAULT_NETWORK_BANDWIDTH);
    let mut server = TurnServer::new(cfg, pool, now, unix);
    let server_addr: SocketAddr = "127.0.0.1:3478".parse().unwrap();
    let client_addr: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let peer: SocketAddr = "127.0.0.1:9999".parse().unwrap();
    let creds = rest_credentials(b"bench-secret", unix + 3600, "bench.0011223344556677");
    let mut client = TurnClient::new(
        server_addr,
        TurnCredentials {
            username: creds.username,
            password: creds.password,
        },
        now,
    );
    client.allocate(now);
    let mut out = vec![0u8; 2048];
    let mut relayed = None;
    let mut channel = None;
    for _ in 0..20 {
        while let Some(t) = client.poll_transmit() {
            if let ClientAction::Reply(n) =
                server.handle_client(now, client_addr, &t.payload, &mut out)
            {
                let _ = client.handle_input(now, server_addr, &out[..n]);
            }
        }
        while let Some(ev) = client.poll_event() {
            match ev {
                TurnEvent::Allocated { relayed: r, .. } => {
                    relayed = Some(r);
                    client.bind_channel(peer, now).unwrap();
                }
                TurnEvent::ChannelBound { channel: c, .. } => channel = Some(c),
                TurnEvent::Failed { op, code, reason } => {
                    panic!("{op:?} failed: {code:?} {reason}")
                }
                _ => {}
            }
        }
        if channel.is_some() {
            break;
        }
    }
    TurnPair {
        server,
        client_addr,
        peer,
        relayed: relayed.expect("allocated"),
        channel: channel.expect("channel bound"),
        now,
    }
}
