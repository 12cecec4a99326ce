//! What a rate-limit check costs, and that it does not grow with the number of callers
//! (issue 14: lookups are O(1)): `Limiter::admit` for one hot key, and for a key drawn
//! from 1,000 and from 100,000 remembered callers (the table at its bound, evicting).
//! Run: `cargo bench -p agent --bench ratelimit`.

use std::{hint::black_box, net::IpAddr};

use agent::ratelimit::{Caller, KeyClass, LimitSpec, Limiter, Rate};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn limiter(max_keys: usize) -> Limiter {
    Limiter::new(LimitSpec {
        key: KeyClass::SourceIp,
        // High enough that the bench measures the lookup, not refusals.
        rate: Some(Rate::new(1e6, Some(1_000_000)).expect("rate")),
        concurrent: None,
        max_keys,
    })
}

fn caller(i: u32) -> Caller<'static> {
    Caller {
        identity: None,
        ip: IpAddr::from(0x0a00_0000u32.wrapping_add(i).to_be_bytes()),
        subject: None,
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("rate_limit_admit");
    for keys in [1u32, 1_000, 100_000] {
        let l = limiter(keys as usize);
        let callers: Vec<_> = (0..keys).map(caller).collect();
        for c in &callers {
            let _ = l.admit(c);
        }
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::from_parameter(keys), &keys, |b, _| {
            b.iter(|| {
                // A stride through the callers, so successive keys land on other shards.
                i = (i + 7919) % callers.len();
                black_box(l.admit(&callers[i]).is_ok())
            })
        });
    }
    // Ever-new sources against a table of 10,000: each admission evicts one.
    let l = limiter(10_000);
    let mut n = 0u32;
    g.bench_function("flood_of_new_sources", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            black_box(l.admit(&caller(n)).is_ok())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
