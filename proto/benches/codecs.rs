//! Criterion benchmarks of the hot codecs: STUN Binding parse/serialize (stun-rs), the relay's
//! ChannelData forwarding decision (proto::channeldata + the TurnServer lookup, both
//! directions), and probe authentication (proto::probe).
//!
//! `cargo bench -p meshpunch-proto --bench codecs`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "support/turn_pair.rs"]
mod turn_pair;

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshpunch_proto::channeldata;
use meshpunch_proto::probe::{self, ProbeBody, ProbeKey, ProbeSender};
use meshpunch_proto::turn::{ClientAction, PeerAction};
use stun_rs::attributes::stun::{Fingerprint, Software, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{
    MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessageBuilder, TransactionId,
};

fn stun(c: &mut Criterion) {
    let mut g = c.benchmark_group("stun");
    g.throughput(Throughput::Elements(1));
    let encoder = MessageEncoderBuilder::default().build();
    let decoder = MessageDecoderBuilder::default().build();
    let mut buf = [0u8; 512];

    g.bench_function("binding_request_serialize", |b| {
        b.iter(|| {
            let msg = StunMessageBuilder::new(BINDING, MessageClass::Request)
                .with_attribute(Fingerprint::default())
                .build();
            black_box(encoder.encode(&mut buf, &msg).unwrap())
        })
    });
    let req = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_attribute(Software::new("meshpunch/0.1").unwrap())
        .with_attribute(Fingerprint::default())
        .build();
    let n = encoder.encode(&mut buf, &req).unwrap();
    let req_bytes = buf[..n].to_vec();
    g.bench_function("binding_request_parse", |b| {
        b.iter(|| black_box(decoder.decode(black_box(&req_bytes)).unwrap()))
    });

    let mapped: SocketAddr = "203.0.113.7:51820".parse().unwrap();
    let tx = TransactionId::default();
    g.bench_function("binding_response_serialize", |b| {
        b.iter(|| {
            let msg = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
                .with_transaction_id(tx)
                .with_attribute(XorMappedAddress::from(black_box(mapped)))
                .with_attribute(Fingerprint::default())
                .build();
            black_box(encoder.encode(&mut buf, &msg).unwrap())
        })
    });
    let resp = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(tx)
        .with_attribute(XorMappedAddress::from(mapped))
        .with_attribute(Fingerprint::default())
        .build();
    let n = encoder.encode(&mut buf, &resp).unwrap();
    let resp_bytes = buf[..n].to_vec();
    g.bench_function("binding_response_parse", |b| {
        b.iter(|| black_box(decoder.decode(black_box(&resp_bytes)).unwrap()))
    });
    g.finish();
}

fn channel_data(c: &mut Criterion) {
    let mut g = c.benchmark_group("channeldata");
    g.throughput(Throughput::Elements(1));
    let payload = [0xAB_u8; 1200];
    let mut pkt = [0u8; 1204];
    let n = channeldata::encode(0x4001, &payload, &mut pkt).unwrap();
    g.bench_function("parse_1200", |b| {
        b.iter(|| black_box(channeldata::parse(black_box(&pkt[..n])).unwrap().data.len()))
    });
    g.bench_function("write_header", |b| {
        b.iter(|| channeldata::write_header(black_box(0x4001), black_box(1200), &mut pkt).unwrap())
    });

    // The relay's per-packet decision: which allocation, is the channel bound, where to.
    let mut pair = turn_pair::turn_pair();
    let ch = pair.channel;
    let mut out = vec![0u8; 2048];
    for size in [100usize, 1200] {
        let mut frame = vec![0u8; size + 4];
        let len = channeldata::encode(ch, &payload[..size], &mut frame).unwrap();
        g.bench_function(format!("forward_client_to_peer_{size}"), |b| {
            b.iter(|| {
                // Time moves on (1 ms per datagram): the bandwidth buckets refill as in a real
                // flow instead of measuring the drop path.
                pair.now += std::time::Duration::from_millis(1);
                let a = pair.server.handle_client(
                    pair.now,
                    pair.client_addr,
                    black_box(&frame[..len]),
                    &mut out,
                );
                debug_assert!(matches!(a, ClientAction::Relay { .. }));
                black_box(a)
            })
        });
        let data = &payload[..size];
        g.bench_function(format!("forward_peer_to_client_{size}"), |b| {
            b.iter(|| {
                pair.now += std::time::Duration::from_millis(1);
                let a = pair.server.handle_peer(
                    pair.now,
                    pair.relayed,
                    pair.peer,
                    black_box(data),
                    &mut out,
                );
                debug_assert!(matches!(a, PeerAction::ChannelData { .. }));
                black_box(a)
            })
        });
    }
    g.finish();
}

fn probes(c: &mut Criterion) {
    let mut g = c.benchmark_group("probe");
    g.throughput(Throughput::Elements(1));
    let key = ProbeKey::derive(&[1; 32], &[2; 32]);
    let mut sender = ProbeSender::new(key.clone());
    let body = ProbeBody::Pong {
        tx: [9; 12],
        observed: "198.51.100.4:41641".parse().unwrap(),
    };
    let mut out = Vec::with_capacity(probe::MAX_PROBE_LEN);
    g.bench_function("seal_pong", |b| {
        b.iter(|| black_box(sender.seal(1_700_000_000_000, black_box(&body), &mut out)))
    });
    sender.seal(1_700_000_000_000, &body, &mut out);
    let sealed = out.clone();
    g.bench_function("authenticate_pong", |b| {
        b.iter(|| black_box(probe::decode(&key, black_box(&sealed)).unwrap()))
    });
    let mut forged = sealed.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    g.bench_function("reject_forged_pong", |b| {
        b.iter(|| black_box(probe::decode(&key, black_box(&forged)).is_err()))
    });
    g.bench_function("derive_session_key", |b| {
        b.iter(|| black_box(ProbeKey::derive(black_box(&[1; 32]), black_box(&[2; 32])).id()))
    });
    g.finish();
}

criterion_group!(benches, stun, channel_data, probes);
criterion_main!(benches);
