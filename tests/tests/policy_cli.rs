//! `agent policy check` and `agent policy eval`: offline, no privileges needed.

use std::process::Command;

use simnode::workspace_bin;

fn agent(args: &[&str]) -> (i32, String) {
    let out = Command::new(workspace_bin("agent"))
        .args(args)
        .output()
        .expect("run agent");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn file(name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("agent-policy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

const POLICY: &str = "default: authenticated\nrules:\n  - name: web\n    action: allow\n    from: { identities: [\"spiffe://td/ns/web/*\"] }\n    to: { ports: [8080] }\n  - name: no-admin\n    action: deny\n    http: { paths: [\"/admin*\"] }\n  - name: office\n    action: deny\n    from: { cidrs: [\"192.0.2.0/24\"] }\n";

#[test]
fn check_accepts_a_good_file_and_shows_the_default() {
    let (code, out) = agent(&["policy", "check", &file("good.yaml", POLICY)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok, 3 rules, default Authenticated"), "{out}");
}

#[test]
fn check_rejects_with_file_line_and_reason() {
    let bad = file(
        "bad.yaml",
        "rules:\n  - name: a\n    action: allow\n    from: { cidrs: [\"10.1.2.3/33\"] }\n",
    );
    let (code, out) = agent(&["policy", "check", &bad]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("bad.yaml:4:") && out.contains("not a CIDR"),
        "{out}"
    );
}

#[test]
fn eval_prints_the_decision_and_the_rule() {
    let p = file("eval.yaml", POLICY);
    // (from, port, method, path): exit code and the decision line.
    let cases = [
        (
            ("spiffe://td/ns/web/sa/x", "8080", "GET", "/"),
            0,
            "ALLOW request by `web`",
        ),
        (
            ("spiffe://td/ns/web/sa/x", "8080", "GET", "/admin/x"),
            1,
            "DENY request by `no-admin`",
        ),
        (
            ("spiffe://td/ns/db/sa/x", "5432", "GET", "/"),
            0,
            "default authenticated",
        ),
        (
            ("192.0.2.7", "5432", "GET", "/"),
            1,
            "DENY connection by `office`",
        ),
        (
            ("unauthenticated", "5432", "GET", "/"),
            1,
            "DENY request by `default authenticated`",
        ),
    ];
    for ((from, port, method, path), code, needle) in cases {
        let (c, out) = agent(&[
            "policy", "eval", "--policy", &p, "--from", from, "--port", port, "--method", method,
            "--path", path,
        ]);
        assert_eq!(
            (c, out.contains(needle)),
            (code, true),
            "{from} {port} {method} {path}: {out}"
        );
    }
    let (c, out) = agent(&[
        "policy",
        "eval",
        "--policy",
        &p,
        "--from",
        "spiffe://td/ns/web/sa/x",
        "--port",
        "8080",
    ]);
    assert_eq!(c, 2, "HTTP rules need --method/--path: {out}");
}

#[test]
fn eval_decides_an_edge_client_by_its_certificate() {
    let p = file(
        "edge.yaml",
        "rules:\n  - name: partners\n    action: allow\n    from: { client_cert: { sans: [\"*.partner.example\"] } }\n    http: { paths: [\"/orders/*\"] }\n",
    );
    let eval = |san: &str, path: &str| {
        agent(&[
            "policy",
            "eval",
            "--policy",
            &p,
            "--from",
            "unauthenticated",
            "--port",
            "8443",
            "--client-san",
            san,
            "--client-subject",
            "O=Partner, CN=shop",
            "--method",
            "GET",
            "--path",
            path,
        ])
    };
    let (c, out) = eval("shop.partner.example", "/orders/7");
    assert_eq!(c, 0, "{out}");
    assert!(out.contains("ALLOW request by `partners`"), "{out}");
    let (c, out) = eval("shop.other.example", "/orders/7");
    assert_eq!(c, 1, "{out}");
    let (c, out) = eval("shop.partner.example", "/admin");
    assert!(c == 1 && out.contains("default deny"), "{out}");
}

#[test]
fn eval_decides_a_request_by_its_token_claims() {
    let p = file(
        "claims.yaml",
        "rules:\n  - name: admins\n    action: allow\n    from: { claims: { groups: [admins] } }\n    http: { paths: [\"/admin*\"] }\n",
    );
    let eval = |claims: &[&str]| {
        let mut args = vec![
            "policy",
            "eval",
            "--policy",
            &p,
            "--from",
            "unauthenticated",
            "--port",
            "8080",
            "--method",
            "GET",
            "--path",
            "/admin",
        ];
        for c in claims {
            args.extend(["--claim", c]);
        }
        agent(&args)
    };
    let (c, out) = eval(&["sub=bob", "groups=users", "groups=admins"]);
    assert_eq!(c, 0, "{out}");
    assert!(out.contains("ALLOW request by `admins`"), "{out}");
    let (c, out) = eval(&["sub=alice", "groups=users"]);
    assert!(c == 1 && out.contains("default deny"), "{out}");
}
