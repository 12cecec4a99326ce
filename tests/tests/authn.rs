//! End-user authentication on a simulated node: a pod with no login of its own gets JWT
//! bearer tokens checked in front of it (ES256, RS256, EdDSA; iss, aud, exp, nbf with
//! skew), a 401 naming the reason otherwise, claims deciding rules, the verified subject
//! passed in a header the client cannot forge, and the key set hot-reloaded; or basic
//! authentication from a bcrypt/Argon2 credentials file. The client is curl on the node;
//! the app records every request it sees.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};
use simnode::{
    jwt::{now, write_jwks, SigningKey},
    time::scaled,
    Agent, AgentConfig, Node,
};

const ISSUER: &str = "https://login.test";

const POLICY: &str = r#"
default: deny
rules:
  - name: admins
    action: allow
    from: { claims: { groups: ["admins"] } }
    http: { paths: ["/admin*"] }
  - name: shoppers
    action: allow
    from: { unauthenticated: true }
    http: { paths: ["/shop*"] }
"#;

/// Pod `b`'s table: PERMISSIVE (the clients are outside the mesh, in plaintext), its
/// policy, and `[pod.authn]` on port 8080 trusting `jwks`.
fn pod_b(node: &Node, jwks: &Path) -> toml::Table {
    let policy = node.tmp().join("b-policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let text = format!(
        "policy = \"{}\"\n[authn]\nports = [8080]\nsubject_header = \"x-user\"\n\
         [[authn.jwt]]\nissuer = \"{ISSUER}\"\naudiences = [\"shop\"]\njwks = \"{}\"\n\
         clock_skew_seconds = 60\n",
        policy.display(),
        jwks.display()
    );
    toml::from_str(&text).unwrap()
}

fn claims(sub: &str, groups: &[&str]) -> Value {
    json!({"iss": ISSUER, "aud": "shop", "sub": sub, "groups": groups, "exp": now() + 600, "iat": now()})
}

/// What curl got: status, the WWW-Authenticate header, and the body.
#[derive(Debug)]
struct Reply {
    status: u16,
    challenge: String,
    body: String,
}

fn get(node: &Node, to: std::net::SocketAddr, path: &str, headers: &[String]) -> Reply {
    let head = node.tmp().join("curl-head.txt");
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time"])
        .arg(
            scaled(std::time::Duration::from_secs(10))
                .as_secs()
                .to_string(),
        )
        .arg("-D")
        .arg(&head)
        .args(["-w", "\n%{http_code}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(format!("http://{to}{path}"))
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let head = std::fs::read_to_string(&head).unwrap_or_default();
    let challenge = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("www-authenticate"))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    Reply {
        status: code.trim().parse().unwrap_or(0),
        challenge,
        body: body.to_string(),
    }
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

fn jwks_path(node: &Node) -> PathBuf {
    node.tmp().join("jwks.json")
}

#[test]
fn bearer_tokens_are_required_verified_and_their_claims_decide() {
    let Some(node) = node("authn_jwt", &["b"]) else {
        return;
    };
    let b = node.pod("b");
    let es = SigningKey::es256("es-1");
    let rs = SigningKey::rs256("rs-1", &node.tmp().join("keys"));
    let ed = SigningKey::eddsa("ed-1");
    let jwks = write_jwks(&jwks_path(&node), &[&es, &rs, &ed]);
    let srv = b.serve_http(&[8080]);
    let cfg = AgentConfig::new(&node).pod_table(b, "open", pod_b(&node, &jwks));
    let mut agent = Agent::start(&cfg);
    let to = at(b, false, 8080);
    let mut reached = 0;
    let view = &agent.pods()[0]["authn"];
    assert_eq!(
        (
            view["jwt"][0]["issuer"].as_str(),
            view["jwt"][0]["keys"].as_u64()
        ),
        (Some(ISSUER), Some(3)),
        "{view}"
    );

    // A good token from each key: served, the app sees the subject the agent verified
    // (not the one the client claims) and no token.
    for key in [&es, &rs, &ed] {
        let token = key.sign(&claims("alice", &["shoppers"]));
        let r = get(
            &node,
            to,
            "/shop/cart",
            &[bearer(&token), "x-user: mallory".into()],
        );
        assert_eq!(r.status, 200, "{:?}: {r:?}", key.alg);
        reached += 1;
        let seen = &srv.wait_http(reached)[reached - 1];
        assert_eq!(
            seen.headers.get("x-user").map(String::as_str),
            Some("alice"),
            "{seen:?}"
        );
        assert_eq!(
            seen.headers.get("authorization"),
            None,
            "the token went on to the app"
        );
    }
    let record = agent.wait_for(
        "the access record with the subject",
        |e| e["target"] == "access" && e["sub"] == "alice" && e["http_requests"] == 1,
        WAIT,
    );
    assert!(
        !record.to_string().contains("eyJ"),
        "a token in the access log: {record}"
    );

    // Claims decide rules: alice is no admin, bob is.
    let alice = es.sign(&claims("alice", &["shoppers"]));
    let r = get(&node, to, "/admin/users", &[bearer(&alice)]);
    assert_eq!(r.status, 403, "{r:?}");
    let bob = rs.sign(&claims("bob", &["shoppers", "admins"]));
    assert_eq!(get(&node, to, "/admin/users", &[bearer(&bob)]).status, 200);
    reached += 1;

    // Every way a token can be wrong, and none at all: a 401 naming the reason.
    let other = SigningKey::es256("es-1");
    let mut expired = claims("alice", &[]);
    expired["exp"] = json!(now() - 600);
    let mut wrong_aud = claims("alice", &[]);
    wrong_aud["aud"] = json!("billing");
    let mut early = claims("alice", &[]);
    early["nbf"] = json!(now() + 600);
    let mut within_skew = claims("alice", &[]);
    within_skew["nbf"] = json!(now() + 30);
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("expired", vec![bearer(&es.sign(&expired))], "expired"),
        (
            "wrong audience",
            vec![bearer(&ed.sign(&wrong_aud))],
            "wrong_audience",
        ),
        (
            "forged with another key under es-1's kid",
            vec![bearer(&other.sign(&claims("alice", &[])))],
            "bad_signature",
        ),
        (
            "not yet valid",
            vec![bearer(&rs.sign(&early))],
            "not_yet_valid",
        ),
        (
            "unknown issuer",
            vec![bearer(&es.sign(
                &json!({"iss": "https://evil.test", "aud": "shop", "exp": now() + 600}),
            ))],
            "unknown_issuer",
        ),
        ("garbage", vec![bearer("not.a.token")], "malformed"),
    ];
    for (what, headers, reason) in &cases {
        let r = get(&node, to, "/shop", headers);
        assert_eq!(r.status, 401, "{what}: {r:?}");
        assert_eq!(
            r.challenge,
            format!("Bearer realm=\"b\", error=\"invalid_token\", error_description=\"{reason}\""),
            "{what}"
        );
    }
    let missing = get(&node, to, "/shop", &[]);
    assert_eq!(
        (missing.status, missing.challenge.as_str()),
        (401, "Bearer realm=\"b\""),
        "{missing:?}"
    );
    assert_eq!(missing.body, "bearer token missing\n");
    // nbf 30 s ahead is within the 60 s skew.
    assert_eq!(
        get(&node, to, "/shop", &[bearer(&es.sign(&within_skew))]).status,
        200
    );
    reached += 1;
    let paths: Vec<String> = srv
        .wait_http(reached)
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(
        paths,
        [
            "/shop/cart",
            "/shop/cart",
            "/shop/cart",
            "/admin/users",
            "/shop"
        ]
    );
    for (_, _, reason) in &cases {
        agent.wait_for(
            reason,
            |e| e["message"] == "request unauthenticated" && e["reason"] == *reason,
            WAIT,
        );
    }
    let metrics = agent.cli(&["metrics"]).stdout;
    assert!(
        metrics.contains("authn_rejected_total{pod=\"b\",reason=\"expired\"} 1"),
        "{metrics}"
    );
    assert!(agent.stop().success());
}

#[test]
fn the_key_set_reloads_and_a_bad_one_keeps_the_last_good_keys() {
    let Some(node) = node("authn_jwks", &["b"]) else {
        return;
    };
    let b = node.pod("b");
    let old = SigningKey::es256("2026-11");
    let new = SigningKey::eddsa("2026-12");
    let jwks = write_jwks(&jwks_path(&node), &[&old]);
    let _srv = b.serve_http(&[8080]);
    let cfg = AgentConfig::new(&node).pod_table(b, "open", pod_b(&node, &jwks));
    let mut agent = Agent::start(&cfg);
    let to = at(b, false, 8080);
    let with = |key: &SigningKey| {
        get(
            &node,
            to,
            "/shop",
            &[bearer(&key.sign(&claims("alice", &[])))],
        )
        .status
    };
    assert_eq!((with(&old), with(&new)), (200, 401));

    // The issuer rotates: the new key verifies, the retired one no longer does.
    write_jwks(&jwks, &[&new]);
    agent.wait_for("the reload", |e| e["message"] == "JWKS reloaded", WAIT);
    assert_eq!((with(&old), with(&new)), (401, 200));

    // A broken file, then one with a symmetric key: both rejected, the keys in force stay.
    std::fs::write(&jwks, "{\"keys\": [").unwrap();
    agent.wait_for(
        "the rejected file",
        |e| e["message"] == "JWKS reload rejected; the previous key set keeps verifying",
        WAIT,
    );
    std::fs::write(&jwks, r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).unwrap();
    agent.wait_for(
        "the rejected symmetric key",
        |e| {
            e["error"]
                .as_str()
                .is_some_and(|m| m.contains("symmetric key"))
        },
        WAIT,
    );
    assert_eq!(with(&new), 200);
    assert!(agent.stop().success());
}

/// `user:hash` lines: alice with bcrypt (as `htpasswd -B` writes it), bob with Argon2id.
fn htpasswd(path: &Path) {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let alice = bcrypt::hash("wonderland", 5).unwrap();
    let salt = SaltString::encode_b64(b"a fixed test salt").unwrap();
    let bob = argon2::Argon2::default()
        .hash_password(b"builder", &salt)
        .unwrap()
        .to_string();
    std::fs::write(path, format!("# shop users\nalice:{alice}\nbob:{bob}\n")).unwrap();
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Authorization: Basic {b64}")
}

#[test]
fn basic_auth_checks_hashed_credentials_and_names_the_user() {
    let Some(node) = node("authn_basic", &["b"]) else {
        return;
    };
    let b = node.pod("b");
    let file = node.tmp().join("htpasswd");
    htpasswd(&file);
    let policy = node.tmp().join("b-policy.yaml");
    std::fs::write(
        &policy,
        "default: deny\nrules:\n  - name: bob-admin\n    action: allow\n    from: { claims: { sub: [bob] } }\n    http: { paths: [\"/admin*\"] }\n  - name: users\n    action: allow\n    from: { unauthenticated: true }\n    http: { paths: [\"/shop*\"] }\n",
    )
    .unwrap();
    let text = format!(
        "policy = \"{}\"\n[authn]\nports = [8080]\nsubject_header = \"x-user\"\n[authn.basic]\nhtpasswd = \"{}\"\nrealm = \"shop\"\n",
        policy.display(),
        file.display()
    );
    let srv = b.serve_http(&[8080]);
    let cfg = AgentConfig::new(&node).pod_table(b, "open", toml::from_str(&text).unwrap());
    let mut agent = Agent::start(&cfg);
    let to = at(b, false, 8080);

    // Each user, twice (the second from the cache), with a forged user header replaced.
    let mut reached = 0;
    for (user, password) in [("alice", "wonderland"), ("bob", "builder")] {
        for _ in 0..2 {
            let r = get(
                &node,
                to,
                "/shop",
                &[basic(user, password), "x-user: root".into()],
            );
            assert_eq!(r.status, 200, "{user}: {r:?}");
            reached += 1;
            let seen = &srv.wait_http(reached)[reached - 1];
            assert_eq!(seen.headers.get("x-user").map(String::as_str), Some(user));
            assert_eq!(seen.headers.get("authorization"), None);
        }
    }
    // The user is the subject rules see.
    assert_eq!(
        get(&node, to, "/admin", &[basic("alice", "wonderland")]).status,
        403
    );
    assert_eq!(
        get(&node, to, "/admin", &[basic("bob", "builder")]).status,
        200
    );
    reached += 1;

    let challenge = "Basic realm=\"shop\", charset=\"UTF-8\"";
    for (what, headers) in [
        ("a wrong password", vec![basic("alice", "looking-glass")]),
        ("an unknown user", vec![basic("mallory", "wonderland")]),
        ("no credentials", vec![]),
    ] {
        let r = get(&node, to, "/shop", &headers);
        assert_eq!(
            (r.status, r.challenge.as_str()),
            (401, challenge),
            "{what}: {r:?}"
        );
    }
    assert_eq!(
        srv.wait_http(reached).len(),
        reached,
        "a refused request reached the app"
    );

    // A weak hash is refused on reload, and the users in force keep working.
    std::fs::write(&file, "alice:$apr1$abcdefgh$0123456789abcdefghijkl\n").unwrap();
    let rejected = agent.wait_for(
        "the rejected credentials file",
        |e| {
            e["message"]
                == "credentials file reload rejected; the previous users keep authenticating"
        },
        WAIT,
    );
    assert!(
        rejected["error"]
            .as_str()
            .is_some_and(|m| m.contains(":1: user `alice`: only bcrypt")),
        "{rejected}"
    );
    assert_eq!(
        get(&node, to, "/shop", &[basic("bob", "builder")]).status,
        200
    );
    assert!(agent.stop().success());
}
