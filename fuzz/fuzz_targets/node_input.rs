//! Fuzzes the client node's input door: arbitrary datagrams on the data socket, a pool socket
//! and from the relay link's server (STUN answers, TURN messages, probes, WireGuard), with
//! timeouts in between. Nothing may panic and the node must keep answering.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::node::{Event, Node, NodeConfig, PeerSpec, Signal, Socket};
use meshpunch_proto::path::PathConfig;
use meshpunch_proto::wire::RelayRegion;

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let peer = [0xB2u8; 32];
    let mut node = Node::new(
        NodeConfig {
            me: [0xA1; 32],
            data_port: 51000,
            v6: true,
            path: PathConfig::default(),
            signalling: true,
            seed: 7,
            unix_ms: 1_800_000_000_000,
        },
        vec![PeerSpec {
            key: peer,
            static_candidates: vec!["198.51.100.2:51000".parse().unwrap_or_else(|_| unreachable!())],
            static_secret: Some([9; 32]),
        }],
        t0,
    );
    let turn: SocketAddr = "203.0.113.9:3478".parse().unwrap_or_else(|_| unreachable!());
    node.handle_signal(
        t0,
        Signal::Registered {
            observed: "198.51.100.1:40000".parse().unwrap_or_else(|_| unreachable!()),
            stun: vec!["203.0.113.1:3478".parse().unwrap_or_else(|_| unreachable!())],
            relays: vec![RelayRegion {
                region: "fuzz".into(),
                // UDP first; a UDP Allocate left unanswered moves the link to the TLS
                // stream, whose messages arrive on `Socket::Relay`.
                urls: vec![format!("turn:{turn}"), "turns:203.0.113.9:443".to_string()],
                username: "1800086400:fuzz".into(),
                password: "pw".into(),
                expires_unix: 1_800_086_400,
            }],
            shared_socket: true,
            transport: meshpunch_proto::wire::Transport::Quic,
        },
    );
    let mut now = t0;
    // Chunks: [socket selector, source selector, len, bytes...]
    let mut rest = data;
    while rest.len() >= 3 {
        let (sel, src, len) = (rest[0], rest[1], usize::from(rest[2]));
        rest = &rest[3..];
        let n = len.min(rest.len());
        let (pkt, tail) = rest.split_at(n);
        rest = tail;
        now += Duration::from_millis(u64::from(sel & 0x3f) * 10);
        node.handle_timeout(now);
        let stream = node.relay_link().filter(|l| l.transport().is_stream()).map(|l| l.id());
        let socket = match (sel & 0x40 != 0, stream) {
            (true, Some(id)) if src & 0x80 != 0 => Socket::Relay(id),
            (true, _) => Socket::Pool(1),
            _ => Socket::Data,
        };
        if src == 0xFF {
            if let Some(id) = stream {
                node.relay_stream_down(now, id, "fuzz");
            }
        }
        let from = match src % 4 {
            0 => turn,
            1 => "198.51.100.2:51000".parse().unwrap_or_else(|_| unreachable!()),
            2 => "203.0.113.1:3478".parse().unwrap_or_else(|_| unreachable!()),
            _ => SocketAddr::from(([192, 0, 2, src], u16::from(src) * 257)),
        };
        if let Some(d) = node.handle_datagram(now, socket, from, pkt) {
            assert!(pkt.get(d.range).is_some());
        }
        if sel & 0x80 != 0 {
            let _ = node.handle_wireguard(now, 0, pkt);
        }
        while node.poll_transmit().is_some() {}
        while let Some(ev) = node.poll_event() {
            if let Event::OpenRelayStream { link, .. } = ev {
                node.relay_stream_up(now, link);
            }
        }
    }
});
