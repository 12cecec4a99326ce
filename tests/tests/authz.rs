//! Authorization on a simulated node: L4 identity/port rules, default deny, the
//! `unauthenticated` rule in PERMISSIVE, audit mode, and hot reload under load (a broken file
//! is rejected and the old policy keeps deciding). The application records every
//! connection it sees, so "never sees a denied byte" is checked, not assumed.

mod common;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;
use simnode::{pki::DevCa, Agent, AgentConfig, Node};

const TD: &str = "spiffe://td.test/ns";

fn write_policy(node: &Node, name: &str, yaml: &str) -> PathBuf {
    let path = node.tmp().join("policies").join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, yaml).unwrap();
    path
}

fn decision(agent: &Agent, pred: impl Fn(&Value) -> bool) -> Value {
    agent.wait_for(
        "inbound decision",
        |e| e["target"] == "access" && e["direction"] == "inbound" && pred(e),
        WAIT,
    )
}

const B_POLICY: &str = r#"
default: deny
rules:
  - name: allow-a-8080
    action: allow
    from: { identities: ["spiffe://td.test/ns/default/sa/a"] }
    to: { ports: [8080] }
"#;

#[test]
fn identity_and_port_rules_with_default_deny() {
    let Some(node) = node("authz_l4", &["a", "x", "b"]) else {
        return;
    };
    let (a, x, b) = (node.pod("a"), node.pod("x"), node.pod("b"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let sa = ca.issue(&format!("{TD}/default/sa/a"), &node.tmp().join("a"), false);
    let sx = ca.issue(&format!("{TD}/other/sa/a"), &node.tmp().join("x"), false);
    let sb = ca.issue(&format!("{TD}/default/sa/b"), &node.tmp().join("b"), false);
    let srv = b.serve(&[8080, 9090]);
    let policy = write_policy(&node, "b.yaml", B_POLICY);
    let cfg = AgentConfig::new(&node)
        .mesh()
        .pod_extra(a, "open", &sa.toml())
        .pod_extra(x, "open", &sx.toml())
        .pod_extra(b, "open", &sb.toml_strict(&policy));
    let mut agent = Agent::start(&cfg);
    for v6 in [false, true] {
        assert!(
            only(&a.client(at(b, v6, 8080), &[]).results).ok(),
            "a may reach 8080"
        );
        let seen = srv.seen().len();
        assert_eq!(a.client(at(b, v6, 9090), &[]).ok, 0, "a may not reach 9090");
        assert_eq!(
            x.client(at(b, v6, 8080), &[]).ok,
            0,
            "another namespace may not reach 8080"
        );
        assert_eq!(
            srv.seen().len(),
            seen,
            "the application saw a denied connection"
        );
    }
    let ok = decision(&agent, |e| e["outcome"] == "ok");
    assert_eq!(ok["policy_rule"], "allow-a-8080");
    assert_eq!(ok["peer_identity"], format!("{TD}/default/sa/a"));
    let denied = decision(&agent, |e| {
        e["outcome"] == "denied" && e["dst"].as_str().unwrap().ends_with(":9090")
    });
    assert_eq!(denied["policy_rule"], "default deny");
    let other = decision(&agent, |e| {
        e["outcome"] == "denied" && e["peer_identity"] == format!("{TD}/other/sa/a")
    });
    assert_eq!(other["policy_rule"], "default deny");
    assert!(agent.stop().success());
    let e = agent.wait_for("proxy counters", |e| e["message"] == "proxy counters", WAIT);
    let c: Value = serde_json::from_str(e["counters"].as_str().unwrap()).unwrap();
    assert_eq!(c["authz_allow:allow-a-8080"], 2);
    assert_eq!(c["authz_deny:default deny"], 4);
}

#[test]
fn unauthenticated_rule_in_permissive_and_audit_mode() {
    let Some(node) = node("authz_unauthenticated", &["p", "q"]) else {
        return;
    };
    let (p, q) = (node.pod("p"), node.pod("q"));
    let _sp = p.serve(&[8080, 9090]);
    let _sq = q.serve(&[9090]);
    let pp = write_policy(
        &node,
        "p.yaml",
        "rules:\n  - name: plaintext-8080\n    action: allow\n    from: { unauthenticated: true }\n    to: { ports: [8080] }\n",
    );
    let pq = write_policy(&node, "q.yaml", "default: deny\naudit: true\n");
    let cfg = AgentConfig::new(&node)
        .pod_extra(p, "open", &format!("policy = \"{}\"", pp.display()))
        .pod_extra(q, "open", &format!("policy = \"{}\"", pq.display()));
    let mut agent = Agent::start(&cfg);
    // p is PERMISSIVE (no identity): plaintext is marked unauthenticated and matched by the
    // explicit rule on 8080 only.
    assert!(only(&node.host_client(at(p, false, 8080), &[]).results).ok());
    assert_eq!(
        decision(&agent, |e| e["pod"] == "p" && e["outcome"] == "ok")["policy_rule"],
        "plaintext-8080"
    );
    assert_eq!(node.host_client(at(p, false, 9090), &[]).ok, 0);
    // q is in audit mode: denied by default, but let through and reported.
    assert!(only(&node.host_client(at(q, false, 9090), &[]).results).ok());
    agent.wait_for(
        "audit line",
        |e| {
            e["message"] == "audit: this connection would be denied"
                && e["pod"] == "q"
                && e["rule"] == "default deny"
        },
        WAIT,
    );
    assert!(agent.stop().success());
}

#[test]
fn reload_under_load_switches_rules_and_a_broken_file_keeps_the_old_policy() {
    let Some(node) = node("authz_reload", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080, 9090]);
    let v1 = "rules:\n  - name: keep\n    action: allow\n    to: { ports: [8080] }\n  - name: flip\n    action: allow\n    to: { ports: [9090] }\n";
    let v2 = "rules:\n  - name: keep\n    action: allow\n    to: { ports: [8080] }\n  - name: flip\n    action: deny\n    to: { ports: [9090] }\n";
    let path = write_policy(&node, "b.yaml", v1);
    let cfg =
        AgentConfig::new(&node).pod_extra(b, "open", &format!("policy = \"{}\"", path.display()));
    let mut agent = Agent::start(&cfg);
    assert!(
        only(&a.client(at(b, false, 9090), &[]).results).ok(),
        "v1 allows 9090"
    );

    // A loop of short connections on the port whose rule does not change.
    let load = a.client_spawn(
        at(b, false, 8080),
        &["--count", "300", "--concurrency", "3", "--hold-ms", "10"],
    );
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&path, v2).unwrap();
    let reloaded = |e: &Value| e["message"] == "policy reloaded" && e["pod"] == "b";
    agent.wait_for("reload", reloaded, WAIT);
    assert_eq!(
        a.client(at(b, false, 9090), &[]).ok,
        0,
        "the new rule denies 9090"
    );
    // SIGHUP reloads too (here: the same, still good, file).
    let reloads = |a: &Agent| a.events().iter().filter(|e| reloaded(e)).count();
    let before = reloads(&agent);
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent.wait_for("SIGHUP reload", |_| reloads(&agent) > before, WAIT);

    std::fs::write(
        &path,
        "rules:\n  - name: broken\n    action: allow\n    to: { ports: [99999] }\n",
    )
    .unwrap();
    let rejected = agent.wait_for(
        "rejection",
        |e| e["message"] == "policy reload rejected; the last good policy keeps deciding",
        WAIT,
    );
    let err = rejected["error"].as_str().unwrap();
    assert!(
        err.contains("b.yaml:4:") && err.contains("not a port"),
        "rejection names file, line, reason: {err}"
    );
    let r = simnode::client_result(load);
    assert_eq!(
        (r.ok, r.failed),
        (300, 0),
        "unchanged rule failed during reload: {:?}",
        r.errors
    );
    assert!(
        only(&a.client(at(b, false, 8080), &[]).results).ok(),
        "old policy still allows 8080"
    );
    assert_eq!(
        a.client(at(b, false, 9090), &[]).ok,
        0,
        "old policy still denies 9090"
    );
    let denied = decision(&agent, |e| e["outcome"] == "denied");
    assert_eq!(denied["policy_rule"], "flip");
    assert!(agent.stop().success());
    let counters = agent.wait_for(
        "reload counters",
        |e| e["message"] == "reload counters",
        WAIT,
    );
    assert!(
        counters["policy_reloads_failed"].as_u64() >= Some(1),
        "{counters}"
    );
    assert!(
        counters["policy_reloads_ok"].as_u64() >= Some(2),
        "{counters}"
    );
}

#[test]
fn a_pod_without_any_policy_denies_everything() {
    let Some(node) = node("authz_no_policy", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let srv = b.serve(&[8080]);
    // No default_policy and no pod policy: the agent's own default applies.
    let text = format!(
        "pin_root = \"{}\"\n[[pod]]\nname = \"b\"\nnetns = \"{}\"\ncgroup = \"{}\"\nfail_mode = \"open\"\n",
        node.pin_root().display(),
        b.netns_path.display(),
        b.cgroup.display()
    );
    let path = node.tmp().join("raw.toml");
    std::fs::write(&path, text).unwrap();
    let mut agent = Agent::start_file(&path);
    assert_eq!(a.client(at(b, false, 8080), &[]).ok, 0);
    assert!(srv.seen().is_empty());
    assert_eq!(decision(&agent, |_| true)["policy_rule"], "default deny");
    assert!(agent.stop().success());
}

const HTTP_POLICY: &str = r#"
default: deny
rules:
  - name: public-read
    action: allow
    from: { identities: ["spiffe://td.test/ns/default/*"] }
    to: { ports: [8080] }
    http: { methods: [GET], paths: ["/public", "/public/*"] }
  - name: no-admin
    action: deny
    http: { paths: ["/admin*"] }
"#;

#[test]
fn http_requests_are_decided_one_by_one_on_keep_alive_and_http2() {
    let Some(node) = node("authz_http", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let sa = ca.issue(&format!("{TD}/default/sa/a"), &node.tmp().join("a"), false);
    let sb = ca.issue(&format!("{TD}/default/sa/b"), &node.tmp().join("b"), false);
    let srv = b.serve_http(&[8080]);
    let policy = write_policy(&node, "b.yaml", HTTP_POLICY);
    let cfg = AgentConfig::new(&node)
        .mesh()
        .pod_extra(a, "open", &sa.toml())
        .pod_extra(b, "open", &sb.toml_strict(&policy));
    let mut agent = Agent::start(&cfg);
    let requests = "GET /public,POST /admin,GET /public/x,GET /admin/users,POST /public";
    for (h2, v6) in [(false, false), (true, false), (false, true), (true, true)] {
        let before = srv.seen_http().len();
        let r = a.http_client(at(b, v6, 8080), requests, h2);
        assert_eq!(
            r.error, None,
            "h2={h2} v6={v6}: the connection must survive denials"
        );
        assert_eq!(r.statuses, [200, 403, 200, 403, 403], "h2={h2} v6={v6}");
        assert!(
            r.bodies[1].contains("no-admin"),
            "403 names the rule: {:?}",
            r.bodies[1]
        );
        assert!(r.bodies[4].contains("default deny"), "{:?}", r.bodies[4]);
        let seen: Vec<String> = srv.seen_http()[before..]
            .iter()
            .map(|s| format!("{} {}", s.method, s.path))
            .collect();
        assert_eq!(
            seen,
            ["GET /public", "GET /public/x"],
            "the app saw a denied request"
        );
        if h2 {
            assert!(srv.seen_http().last().unwrap().version.contains("HTTP/2"));
        }
    }
    let denied = agent.wait_for(
        "denied request line",
        |e| e["message"] == "request denied" && e["path"] == "/admin",
        WAIT,
    );
    assert_eq!(denied["policy_rule"], "no-admin");
    let conn = decision(&agent, |e| e["http_requests"] == 5);
    assert_eq!(conn["http_denied"], 3);
    assert!(agent.stop().success());
}

#[test]
fn egress_rules_refuse_outbound_connections_before_any_upstream_connect() {
    let Some(node) = node("authz_egress", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let srv = b.serve(&[8080, 9090]);
    let policy = write_policy(
        &node,
        "a.yaml",
        &format!(
            "default: deny\negress:\n  default: deny\n  rules:\n    - name: b-web\n      action: allow\n      to: {{ cidrs: [\"{}\", \"{}\"], ports: [8080] }}\n",
            b.ip4, b.ip6
        ),
    );
    let cfg =
        AgentConfig::new(&node).pod_extra(a, "open", &format!("policy = \"{}\"", policy.display()));
    let mut agent = Agent::start(&cfg);
    for v6 in [false, true] {
        assert!(only(&a.client(at(b, v6, 8080), &[]).results).ok());
        let seen = srv.seen().len();
        assert_eq!(
            a.client(at(b, v6, 9090), &[]).ok,
            0,
            "egress to 9090 must be refused"
        );
        assert_eq!(
            srv.seen().len(),
            seen,
            "the destination saw a refused connection"
        );
    }
    let out = agent.wait_for(
        "egress denial",
        |e| e["direction"] == "outbound" && e["outcome"] == "denied",
        WAIT,
    );
    assert_eq!(out["reason"], "egress_policy");
    assert_eq!(out["policy_rule"], "egress default deny");
    let ok = agent.wait_for(
        "egress allow",
        |e| e["direction"] == "outbound" && e["outcome"] == "ok",
        WAIT,
    );
    assert_eq!(ok["policy_rule"], "b-web");
    assert!(agent.stop().success());
}

/// Pod `b` fail-closed with a policy allowing any plaintext HTTP request (these tests are
/// about how the head arrives) and a header timeout of 1.5 s.
fn plain_http_pod(node: &Node, b: &simnode::Pod) -> AgentConfig {
    let policy = write_policy(
        node,
        "b.yaml",
        "default: deny\nrules:\n  - name: plain-http\n    action: allow\n    from: { unauthenticated: true }\n    http: { paths: [\"/*\"] }\n",
    );
    AgentConfig::new(node)
        .value("http_header_timeout_ms", 1500)
        .pod_extra(b, "closed", &format!("policy = \"{}\"", policy.display()))
}

/// Connects from the node to `to` and sends an HTTP request head one byte every 200 ms;
/// returns how long the agent let it go on before closing, or `None` if it never did
/// within `limit`.
fn trickle_headers(to: std::net::SocketAddr, limit: Duration) -> Option<Duration> {
    use std::io::{ErrorKind, Read, Write};
    let head = b"GET /public HTTP/1.1\r\nhost: b\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let mut s = std::net::TcpStream::connect_timeout(&to, WAIT).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    for byte in head.iter().cycle() {
        if start.elapsed() > limit {
            return None;
        }
        if s.write_all(&[*byte]).is_err() {
            return Some(start.elapsed());
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            // Closed, reset, or answered (a 408) before the close.
            _ => return Some(start.elapsed()),
        }
    }
    unreachable!("cycle never ends")
}

#[test]
fn slow_headers_are_closed_at_the_header_timeout_and_huge_heads_refused() {
    let Some(node) = node("authz_slowloris", &["b"]) else {
        return;
    };
    let b = node.pod("b");
    let srv = b.serve_http(&[8080]);
    let cfg = plain_http_pod(&node, b).value("http_max_header_bytes", 16 * 1024);
    let mut agent = Agent::start(&cfg);
    // Five slow clients at once: each is closed soon after the timeout, none holds on.
    let to = at(b, false, 8080);
    let slow: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || trickle_headers(to, Duration::from_secs(10))))
        .collect();
    for (i, t) in slow.into_iter().enumerate() {
        let held = t.join().unwrap();
        let held = held.unwrap_or_else(|| panic!("slow client {i} was never closed"));
        println!("slow client {i} closed after {held:?}");
        assert!(
            held >= Duration::from_millis(1000),
            "client {i} closed before the timeout: {held:?}"
        );
    }
    assert!(
        srv.seen_http().is_empty(),
        "a partial request reached the app"
    );

    // A head over the limit is refused with 431; one under it is served.
    let big = format!("x-big: {}\r\n", "a".repeat(20 * 1024));
    let answer = |extra: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&to, WAIT).expect("connect");
        s.set_read_timeout(Some(WAIT)).unwrap();
        // The agent answers an oversized head as soon as it has read past the limit and
        // closes: the rest of our write may then fail (EPIPE), the answer is already here.
        let _ = write!(
            s,
            "GET /public HTTP/1.1\r\nhost: b\r\nconnection: close\r\n{extra}\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let refused = answer(&big);
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused:?}");
    let served = answer("x-small: a\r\n");
    assert!(served.starts_with("HTTP/1.1 200"), "{served:?}");
    assert_eq!(srv.seen_http().len(), 1, "the refused head reached the app");
    assert!(agent.stop().success());
}

/// An HTTP/2 client from the node: the preface and SETTINGS, then, if `trickle`, a
/// HEADERS frame without END_HEADERS and a CONTINUATION whose payload comes a byte every
/// 200 ms. Returns how long the agent let the connection live, or `None` if it still
/// lived at `limit`.
fn h2_client(to: std::net::SocketAddr, trickle: bool, limit: Duration) -> Option<Duration> {
    use std::io::{ErrorKind, Read, Write};
    let frame = |kind: u8, flags: u8, len: u32, payload: &[u8]| {
        let l = len.to_be_bytes();
        let mut f = vec![
            l[1],
            l[2],
            l[3],
            kind,
            flags,
            0,
            0,
            0,
            u8::from(kind != 0x4),
        ];
        f.extend_from_slice(payload);
        f
    };
    let mut s = std::net::TcpStream::connect_timeout(&to, WAIT).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    s.write_all(&frame(0x4, 0, 0, &[])).unwrap();
    if trickle {
        // HEADERS on stream 1 (END_STREAM, no END_HEADERS): :method GET, :scheme http.
        s.write_all(&frame(0x1, 0x1, 2, &[0x82, 0x86])).unwrap();
        // A CONTINUATION announcing 200 bytes of header block.
        s.write_all(&frame(0x9, 0x4, 200, &[])).unwrap();
    }
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        if trickle && s.write_all(&[0x84]).is_err() {
            return Some(start.elapsed());
        }
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            // The agent's SETTINGS and ACK: the connection lives.
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[test]
fn http2_headers_trickled_are_closed_at_the_header_timeout_and_idle_http2_is_not() {
    let Some(node) = node("authz_h2_slowloris", &["b"]) else {
        return;
    };
    let b = node.pod("b");
    let srv = b.serve_http(&[8080]);
    let cfg = plain_http_pod(&node, b);
    let mut agent = Agent::start(&cfg);
    let to = at(b, false, 8080);
    let idle = std::thread::spawn(move || h2_client(to, false, Duration::from_secs(4)));
    let slow: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || h2_client(to, true, Duration::from_secs(10))))
        .collect();
    for (i, t) in slow.into_iter().enumerate() {
        let held = t.join().unwrap();
        let held = held.unwrap_or_else(|| panic!("trickling HTTP/2 client {i} was never closed"));
        println!("trickling HTTP/2 client {i} closed after {held:?}");
        assert!(
            held >= Duration::from_millis(1000) && held < Duration::from_secs(5),
            "client {i} closed at {held:?}, not at the 1.5 s header timeout"
        );
    }
    assert_eq!(
        idle.join().unwrap(),
        None,
        "an idle HTTP/2 connection (no request begun) was closed by the header timeout"
    );
    assert!(
        srv.seen_http().is_empty(),
        "a partial request reached the app"
    );
    assert!(agent.stop().success());
}
