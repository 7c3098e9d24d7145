//! Allocation check of the relay hot path: a counting global allocator around the TURN
//! server core's per-packet work (ChannelData client→peer and peer→client decisions, ChannelData
//! framing). Fails if any relayed packet touches the heap.
//!
//! Runs under `cargo test` (the bench target has `test = true`) and under
//! `cargo bench -p meshpunch-proto --bench relay_alloc`, printing the counts.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "support/turn_pair.rs"]
mod turn_pair;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use meshpunch_proto::channeldata;
use meshpunch_proto::turn::{ClientAction, PeerAction};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: delegates to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const PACKETS: u64 = 100_000;

fn main() {
    let mut pair = turn_pair::turn_pair();
    let payload = [0x5A_u8; 1200];
    let mut frame = [0u8; 1204];
    let mut out = vec![0u8; 2048];
    let mut reply = [0u8; 1204];
    // Warm up (first-use lazies, if any, are not per packet).
    let len = channeldata::encode(pair.channel, &payload[..100], &mut frame).unwrap();
    let _ = pair
        .server
        .handle_client(pair.now, pair.client_addr, &frame[..len], &mut out);

    let before = ALLOCS.load(Ordering::Relaxed);
    let mut relayed = 0u64;
    for i in 0..PACKETS {
        let size = if i % 2 == 0 { 100 } else { 1200 };
        // 100 µs per round trip (~13 MB/s): under the default per-allocation and per-network
        // limits, which the pair has on, so every packet passes both buckets.
        let now = pair.now + std::time::Duration::from_micros(i * 100);
        let len = channeldata::encode(pair.channel, &payload[..size], &mut frame).unwrap();
        if let ClientAction::Relay { range, .. } =
            pair.server
                .handle_client(now, pair.client_addr, black_box(&frame[..len]), &mut out)
        {
            relayed += 1;
            black_box(&frame[range]);
        }
        reply[4..4 + size].copy_from_slice(&payload[..size]);
        if let PeerAction::ChannelData { channel, .. } = pair.server.handle_peer(
            now,
            pair.relayed,
            pair.peer,
            black_box(&reply[4..4 + size]),
            &mut out,
        ) {
            channeldata::write_header(channel, size, &mut reply).unwrap();
            relayed += 1;
        }
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    println!(
        "relay hot path: {relayed} packets relayed (both directions), {allocs} heap allocations"
    );
    assert_eq!(relayed, 2 * PACKETS, "every packet must be relayed");
    assert_eq!(allocs, 0, "the relay hot path allocated {allocs} times");
}
