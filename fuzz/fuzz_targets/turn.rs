//! Fuzz the TURN server core and the TURN client: arbitrary datagrams (split into a sequence
//! by a 1-byte length prefix) from clients and peers never panic, and every reply fits the
//! output buffer.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::turn::{Auth, ClientAction, PortPool, ServerConfig, TurnServer};
use meshpunch_proto::turn_client::{TurnClient, TurnCredentials};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut cfg = ServerConfig::new(
        "fuzz",
        Auth {
            secrets: vec![b"secret".to_vec()],
            users: Default::default(),
        },
        [1u8; 32],
    );
    cfg.policy.allow_loopback = true;
    let pool = PortPool::new(
        vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))],
        50000,
        50003,
        2,
    )
    .with_network_limits(3, meshpunch_proto::turn::DEFAULT_NETWORK_BANDWIDTH);
    let mut server = TurnServer::new(cfg, pool, now, 1_800_000_000);
    let server_addr: SocketAddr = "203.0.113.1:3478".parse().unwrap();
    let mut client = TurnClient::new(
        server_addr,
        TurnCredentials {
            username: "1900000000:fuzz.0123456789abcdef".into(),
            password: "pw".into(),
        },
        now,
    );
    client.allocate(now);
    let mut out = vec![0u8; 2048];
    let mut rest = data;
    let mut t = now;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (dgram, next) = tail.split_at(n);
        rest = next;
        let src: SocketAddr =
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, len % 4)), 40000);
        match len % 3 {
            0 => {
                if let ClientAction::Reply(r) = server.handle_client(t, src, dgram, &mut out) {
                    assert!(r <= out.len());
                }
            }
            1 => {
                let relayed: SocketAddr = "203.0.113.1:50000".parse().unwrap();
                let _ = server.handle_peer(t, relayed, src, dgram, &mut out);
            }
            _ => {
                let _ = client.handle_input(t, server_addr, dgram);
                while client.poll_transmit().is_some() {}
                while client.poll_event().is_some() {}
            }
        }
        t += Duration::from_millis(u64::from(len) * 10);
        server.handle_timeout(t);
        client.handle_timeout(t);
    }
});
