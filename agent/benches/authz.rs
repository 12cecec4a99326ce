//! The authorization decision with a large policy: 10,000 rules across 1,000 identities.
//! Targets (issue 4): under 1 µs per L4 decision, under 2 µs per HTTP decision.
//! Run: `cargo bench -p agent --bench authz`.

use std::{fmt::Write, hint::black_box};

use agent::authz::{Conn, Policy, PolicyFile, Request};
use criterion::{criterion_group, criterion_main, Criterion};

fn big_policy() -> Policy {
    let mut y = String::from("default: deny\nrules:\n");
    for i in 0..10_000u32 {
        let id = i % 1000;
        let port = 8000 + (i / 1000);
        // A mix: exact identities, namespace prefixes, and HTTP rules.
        let from = if i % 10 == 0 {
            format!("spiffe://td/ns/ns{id}/*")
        } else {
            format!("spiffe://td/ns/ns{id}/sa/sa{id}")
        };
        let _ = write!(
            y,
            "  - name: r{i}\n    action: {}\n    from: {{ identities: [\"{from}\"] }}\n    to: {{ ports: [{port}] }}\n",
            if i % 50 == 0 { "deny" } else { "allow" }
        );
        if i % 7 == 0 {
            let _ = writeln!(y, "    http: {{ methods: [GET], paths: [\"/api/{i}/*\"] }}");
        }
    }
    Policy::compile("bench", PolicyFile::parse("bench.yaml", &y).expect("valid"))
}

fn bench(c: &mut Criterion) {
    let p = big_policy();
    let src = "10.1.2.3".parse().unwrap();
    let id = "spiffe://td/ns/ns417/sa/sa417";
    c.bench_function("l4 decision, 10k rules / 1k identities", |b| {
        b.iter(|| {
            p.decide_l4(
                black_box(&Conn {
                    identity: Some(id),
                    src,
                    port: 8004,
                    client_cert: None,
                }),
                "td",
            )
        })
    });
    let none = |_: &str, _: &str| false;
    let req = Request {
        method: "GET",
        path: "/api/4417/items",
        has_header: &none,
        claims: None,
    };
    c.bench_function("http decision, 10k rules / 1k identities", |b| {
        b.iter(|| {
            p.decide_http(
                black_box(&Conn {
                    identity: Some(id),
                    src,
                    port: 8004,
                    client_cert: None,
                }),
                black_box(&req),
                "td",
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
