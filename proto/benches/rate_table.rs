//! The per-source rate table under a flood of new (spoofed) sources: the cost of admitting a
//! source that is not in the table, when the table is full, for tables of 4 Ki to 1 Mi
//! sources. Sampled eviction examines a fixed number of entries per insert, so the time per
//! packet must stay flat as the table grows (the old table swept all of it, O(n), and then
//! refused the source). `turn::limits::tests::insert_into_a_full_table_examines_a_constant_number_of_entries`
//! asserts the same with a deterministic count of entries examined.
//!
//! ```sh
//! cargo bench -p meshpunch-proto --bench rate_table
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meshpunch_proto::turn::{Rate, RateTable};

fn flood(c: &mut Criterion) {
    let mut g = c.benchmark_group("rate_table_new_source_into_full_table");
    g.throughput(Throughput::Elements(1));
    let rate = Rate {
        per_sec: 200,
        burst: 400,
    };
    for cap in [4_096usize, 65_536, 1_048_576] {
        let table = RateTable::new(rate, cap);
        let now = Instant::now();
        let mut i = 0u32;
        while table.len() < table.capacity() {
            table.allow(IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()), now);
            i += 1;
        }
        let mut src = 0x6400_0000u32;
        g.bench_with_input(BenchmarkId::from_parameter(cap), &cap, |b, _| {
            b.iter(|| {
                src = src.wrapping_add(1);
                black_box(table.allow(IpAddr::from(src.to_be_bytes()), now))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, flood);
criterion_main!(benches);
