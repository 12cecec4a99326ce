//! What a JWT costs a request: `Authn::bearer` on a token the agent has seen before (the
//! common case: clients reuse a token until it expires), and the ES256 signature check a
//! first sight pays. Target (issue 14): at most 10 µs added per authenticated request.
//! Run: `cargo bench -p agent --bench authn`.

use std::{hint::black_box, sync::Arc};

use agent::{
    authn::{
        jwt::{Issuer, JwksSource, JwksStore},
        Authn,
    },
    types::PodName,
};
use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

fn bench(c: &mut Criterion) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let raw = kp.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..])}]});
    let path = std::env::temp_dir().join(format!("authn-bench-{}.json", std::process::id()));
    std::fs::write(&path, jwks.to_string()).expect("write the JWKS");
    let source = JwksSource {
        path: path.clone(),
        issuer: "https://login.test".into(),
    };
    let store: Arc<JwksStore> =
        JwksStore::load(PodName::parse("bench").expect("name"), source).expect("JWKS");
    let authn = Authn {
        ports: vec![],
        subject_header: None,
        forward_token: false,
        basic: None,
        issuers: vec![Issuer {
            issuer: "https://login.test".into(),
            audiences: vec!["shop".into()],
            skew_seconds: 60,
            jwks: store,
        }],
    };
    let now = agent::authn::now();
    let claims = serde_json::json!({"iss": "https://login.test", "aud": "shop", "sub": "alice",
        "groups": ["shoppers"], "exp": now + 3600});
    let key = EncodingKey::from_ec_der(kp.serialized_der());
    let sign = |n: u64| {
        let mut c = claims.clone();
        c["jti"] = n.into();
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, &c, &key).expect("sign")
    };
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {}", sign(0)).parse().expect("header"),
    );
    let check = |h: &http::HeaderMap| {
        let value = h[http::header::AUTHORIZATION].to_str().expect("ascii");
        authn.bearer(value.trim_start_matches("Bearer "), now)
    };
    check(&headers).expect("a good token");
    c.bench_function("jwt check, token seen before (ES256)", |b| {
        b.iter(|| check(black_box(&headers)).expect("good"))
    });
    // A new token each time, more of them than the cache holds: every check verifies.
    let fresh: Vec<http::HeaderMap> = (1..=10_000)
        .map(|n| {
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {}", sign(n)).parse().expect("header"),
            );
            h
        })
        .collect();
    let mut i = 0;
    c.bench_function("jwt check, first sight (ES256 verify)", |b| {
        b.iter(|| {
            i = (i + 1) % fresh.len();
            check(black_box(&fresh[i])).expect("good")
        })
    });
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, bench);
criterion_main!(benches);
