//! Mutual TLS between pods with SPIFFE identities, on a simulated node: what crosses the
//! wire, the identities each side reports, every rejection reason, STRICT vs PERMISSIVE,
//! rotation under load, openssl interoperability and bad identity files.

mod common;

use std::{net::SocketAddr, process::Command, time::Duration};

use common::*;
use serde_json::Value;
use simnode::{
    capture::{contains, Capture},
    pki::{DevCa, OpensslCa, Svid},
    proto::ConnResult,
    workspace_bin, Agent, AgentConfig, Node,
};

const TD: &str = "spiffe://td.test/ns/default/sa";

/// The agent's config for a node whose pods' addresses form the mesh.
fn mesh(node: &Node) -> AgentConfig {
    AgentConfig::new(node)
        .mesh()
        .set("protocol_detect_timeout_ms = 300")
}

fn id(name: &str) -> String {
    format!("{TD}/{name}")
}

/// The access record of pod `pod`'s connection in `direction` with the given predicate.
fn access(agent: &Agent, pod: &str, direction: &str, pred: impl Fn(&Value) -> bool) -> Value {
    agent.wait_for(
        &format!("{direction} access record of pod {pod}"),
        |e| e["target"] == "access" && e["pod"] == pod && e["direction"] == direction && pred(e),
        WAIT,
    )
}

fn proxy_counter(agent: &Agent, name: &str) -> u64 {
    let e = agent.wait_for("proxy counters", |e| e["message"] == "proxy counters", WAIT);
    let c: Value = serde_json::from_str(e["counters"].as_str().unwrap()).unwrap();
    c[name].as_u64().unwrap_or(0)
}

fn one(r: &simnode::proto::Summary) -> &ConnResult {
    only(&r.results)
}

#[test]
fn mutual_tls_between_pods_hides_the_bytes_and_reports_both_identities() {
    let Some(node) = node("mtls_between_pods", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let sa = ca.issue(&id("a"), &node.tmp().join("a"), false);
    let sb = ca.issue(&id("b"), &node.tmp().join("b"), false);
    let _srv = b.serve(&[8080]);
    let marker = b"SEED 987654321";
    let args = ["--seed", "987654320", "--send", "20000", "--reply", "30000"];

    // The capture works: without the agent the marker is on the wire.
    let cap = Capture::start(b);
    assert!(one(&a.client(at(b, false, 8080), &args)).ok());
    assert!(
        contains(&cap.stop(), marker),
        "capture saw no plaintext: the check below would prove nothing"
    );

    let cfg = mesh(&node)
        .pod_extra(a, "closed", &format!("mode = \"strict\"\n{}", sa.toml()))
        .pod_extra(b, "closed", &format!("mode = \"strict\"\n{}", sb.toml()));
    let mut agent = Agent::start(&cfg);
    for v6 in [false, true] {
        let to = at(b, v6, 8080);
        let cap = Capture::start(b);
        let r = a.client(to, &args);
        let wire = cap.stop();
        let r = one(&r);
        assert!(r.ok() && r.sent_ok && r.reply_ok, "{r:?}");
        assert!(
            !contains(&wire, marker),
            "application bytes in clear on the wire (v6={v6})"
        );
        // TLS 1.3 application-data records: content type 23, legacy version 3.3.
        assert!(
            contains(&wire, &[0x17, 0x03, 0x03]),
            "no TLS records on the wire"
        );
        let out = access(&agent, "a", "outbound", |e| e["dst"] == to.to_string());
        assert_eq!(out["tls"], "mtls");
        assert_eq!(
            out["peer_identity"],
            id("b"),
            "outbound reports the server's identity"
        );
        let inb = access(&agent, "b", "inbound", |e| e["src"] == out["via"]);
        assert_eq!(inb["tls"], "mtls");
        assert_eq!(
            inb["peer_identity"],
            id("a"),
            "inbound reports the client's identity"
        );
        assert_eq!(inb["outcome"], "ok");
    }
    assert!(agent.stop().success());
    uninstall(&node);
}

/// Runs `openssl s_client` against `to` with ALPN agent.mtls/1, optionally presenting an
/// SVID, sends one request of the test protocol and returns what came back.
fn s_client(node: &Node, to: SocketAddr, svid: Option<&Svid>, ca: &std::path::Path) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-quiet",
        "-ign_eof",
        "-tls1_3",
        "-alpn",
        "agent.mtls/1",
        "-connect",
    ])
    .arg(to.to_string())
    .arg("-CAfile")
    .arg(ca);
    if let Some(s) = svid {
        cmd.arg("-cert").arg(s.cert()).arg("-key").arg(s.key());
    }
    let _ = node;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SEND 5 REPLY 7 SEED 1\nhello")
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_rejection_names_its_reason_and_is_counted() {
    let Some(node) = node("mtls_rejections", &["a", "b", "d", "e"]) else {
        return;
    };
    let (a, b, d, e) = (node.pod("a"), node.pod("b"), node.pod("d"), node.pod("e"));
    let t = node.tmp();
    let ca = DevCa::new(&t.join("ca"));
    let ca2 = DevCa::named(&t.join("ca2"), "elsewhere.test");
    let sa = ca.issue(&id("a"), &t.join("a"), false);
    let sb = ca.issue(&id("b"), &t.join("b"), false);
    let sd = ca.issue(&id("d"), &t.join("d"), true); // expired
    let se = ca2.issue(&id("e"), &t.join("e"), false); // untrusted CA...
    std::fs::copy(ca.pem(), se.bundle()).unwrap(); // ...though e itself trusts b's CA
    let other_td = ca.issue("spiffe://other.test/ns/x/sa/c", &t.join("c"), false);
    let _srv = b.serve(&[8080]);
    let cfg = mesh(&node)
        // b's IPv6 address is declared to belong to someone else.
        .set(&format!(
            "[[workload]]\naddress = \"{}\"\nidentity = \"{}\"\n[[workload]]\naddress = \"{}\"\nidentity = \"{}\"",
            b.ip4,
            id("b"),
            b.ip6,
            id("not-b")
        ))
        .pod_extra(a, "open", &sa.toml())
        .pod_extra(b, "open", &format!("mode = \"strict\"\n{}", sb.toml()))
        .pod_extra(d, "open", &sd.toml())
        .pod_extra(e, "open", &se.toml());
    let mut agent = Agent::start(&cfg);

    // Expected identity: v4 matches, v6 is declared to be someone else.
    assert!(one(&a.client(at(b, false, 8080), &[])).ok());
    assert_eq!(a.client(at(b, true, 8080), &[]).ok, 0);
    let r = access(&agent, "a", "outbound", |e| {
        e["outcome"] == "tls_handshake_failed"
    });
    assert_eq!(r["reason"], "unexpected_identity", "{r}");

    // Expired client certificate.
    assert_eq!(d.client(at(b, false, 8080), &[]).ok, 0);
    let r = access(&agent, "b", "inbound", |e| e["reason"] == "expired");
    assert_eq!(r["outcome"], "tls_handshake_failed");

    // Client certificate from a CA that b does not trust.
    assert_eq!(e.client(at(b, false, 8080), &[]).ok, 0);
    access(&agent, "b", "inbound", |e| e["reason"] == "untrusted_ca");

    // Another trust domain, and no client certificate at all (openssl as the client).
    let reply = s_client(&node, at(b, false, 8080), Some(&other_td), &ca.pem());
    assert!(
        !reply.contains("OK peer="),
        "other trust domain got through: {reply}"
    );
    access(&agent, "b", "inbound", |e| {
        e["reason"] == "wrong_trust_domain"
    });
    let reply = s_client(&node, at(b, false, 8080), None, &ca.pem());
    assert!(
        !reply.contains("OK peer="),
        "no client cert got through: {reply}"
    );
    access(&agent, "b", "inbound", |e| e["reason"] == "no_client_cert");

    assert!(agent.stop().success());
    for (name, n) in [
        ("outbound_handshake_failed_unexpected_identity", 1),
        ("inbound_handshake_failed_expired", 1),
        ("inbound_handshake_failed_untrusted_ca", 1),
        ("inbound_handshake_failed_wrong_trust_domain", 1),
        ("inbound_handshake_failed_no_client_cert", 1),
    ] {
        assert_eq!(proxy_counter(&agent, name), n, "counter {name}");
    }
}

#[test]
fn strict_refuses_plaintext_from_outside_and_permissive_marks_it() {
    let Some(node) = node("strict_vs_permissive", &["s", "p"]) else {
        return;
    };
    let (s, p) = (node.pod("s"), node.pod("p"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let ss = ca.issue(&id("s"), &node.tmp().join("s"), false);
    let sp = ca.issue(&id("p"), &node.tmp().join("p"), false);
    let _s1 = s.serve(&[8080]);
    let _s2 = p.serve(&[8080]);
    let cfg = mesh(&node)
        .pod_extra(s, "open", &format!("mode = \"strict\"\n{}", ss.toml()))
        .pod_extra(p, "open", &format!("mode = \"permissive\"\n{}", sp.toml()));
    let mut agent = Agent::start(&cfg);
    for v6 in [false, true] {
        // A plaintext client on the node itself, outside the mesh.
        assert_eq!(
            node.host_client(at(s, v6, 8080), &[]).ok,
            0,
            "STRICT let plaintext in"
        );
        let r = node.host_client(at(p, v6, 8080), &[]);
        assert!(one(&r).ok(), "PERMISSIVE refused plaintext: {r:?}");
    }
    let refused = access(&agent, "s", "inbound", |e| e["outcome"] == "refused");
    assert_eq!(refused["reason"], "plaintext_in_strict_mode");
    let marked = access(&agent, "p", "inbound", |e| e["outcome"] == "ok");
    assert_eq!(marked["peer_identity"], "unauthenticated");
    assert_eq!(marked["tls"], "none");
    assert!(agent.stop().success());
    assert_eq!(proxy_counter(&agent, "inbound_plaintext_refused"), 2);
    assert_eq!(proxy_counter(&agent, "inbound_plaintext_accepted"), 2);
}

#[test]
fn rotation_under_load_fails_no_connection_and_new_handshakes_use_the_new_cert() {
    let Some(node) = node("rotation_under_load", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let sa = ca.issue(&id("a"), &node.tmp().join("a"), false);
    let sb = ca.issue(&id("b"), &node.tmp().join("b"), false);
    let old = sb.serial();
    let _srv = b.serve(&[8080]);
    let cfg = mesh(&node).pod_extra(a, "open", &sa.toml()).pod_extra(
        b,
        "open",
        &format!("mode = \"strict\"\n{}", sb.toml()),
    );
    let mut agent = Agent::start(&cfg);
    // About two seconds of short connections, four at a time.
    let load = a.client_spawn(
        at(b, false, 8080),
        &["--count", "400", "--concurrency", "4", "--hold-ms", "20"],
    );
    std::thread::sleep(Duration::from_millis(500));
    let sb2 = ca.issue(&id("b"), &node.tmp().join("b"), false);
    let new = sb2.serial();
    assert_ne!(old, new);
    let starts =
        |e: &Value, prefix: &str| e["message"].as_str().is_some_and(|m| m.starts_with(prefix));
    agent.wait_for(
        "rotation",
        |e| starts(e, "identity rotated") && e["serial"] == new,
        WAIT,
    );
    // Broken files during rotation keep the previous (good) identity.
    std::fs::write(sb2.cert(), "not a certificate").unwrap();
    agent.wait_for(
        "rejected reload",
        |e| starts(e, "identity reload rejected"),
        WAIT,
    );
    let r = simnode::client_result(load);
    assert_eq!(
        (r.ok, r.failed),
        (400, 0),
        "errors during rotation: {:?}",
        r.errors
    );
    let serials = |agent: &Agent| -> Vec<String> {
        agent
            .access()
            .iter()
            .filter(|e| e["pod"] == "a" && e["outcome"] == "ok")
            .map(|e| e["peer_serial"].as_str().unwrap_or("").to_string())
            .collect()
    };
    agent.wait_for("400 records", |_| serials(&agent).len() >= 400, WAIT);
    let during = serials(&agent);
    assert!(during.contains(&old), "no handshake before the rotation");
    assert!(
        during.contains(&new),
        "no handshake after the rotation used the new cert"
    );
    // After the rejected reload, a fresh handshake still presents the last good certificate.
    assert!(one(&a.client(at(b, false, 8080), &[])).ok());
    agent.wait_for(
        "one more record",
        |_| serials(&agent).len() > during.len(),
        WAIT,
    );
    assert_eq!(serials(&agent).last(), Some(&new));
    assert!(agent.stop().success());
}

#[test]
fn certificates_made_by_openssl_interoperate() {
    let Some(node) = node("openssl_interop", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let ca = OpensslCa::new(&node.tmp().join("ossl"));
    let sa = ca.issue(&id("a"), "a");
    let sb = ca.issue(&id("b"), "b");
    let client = ca.issue(&id("tester"), "tester");
    let _srv = b.serve(&[8080]);
    let cfg = mesh(&node).pod_extra(a, "open", &sa.toml()).pod_extra(
        b,
        "open",
        &format!("mode = \"strict\"\n{}", sb.toml()),
    );
    let mut agent = Agent::start(&cfg);
    let r = a.client(at(b, false, 8080), &[]);
    assert!(one(&r).ok(), "{r:?}");
    assert_eq!(
        access(&agent, "b", "inbound", |_| true)["peer_identity"],
        id("a")
    );
    // openssl s_client holding a valid SVID reaches b's application through its proxy.
    let reply = s_client(&node, at(b, false, 8080), Some(&client), &sb.bundle());
    assert!(
        reply.contains("OK peer=127.0.0.6"),
        "s_client reply: {reply:?}"
    );
    access(&agent, "b", "inbound", |e| {
        e["peer_identity"] == id("tester")
    });
    assert!(agent.stop().success());
}

#[test]
fn bad_identity_files_stop_the_agent_at_start_with_the_reason() {
    let Some(node) = node("bad_identity_files", &["a"]) else {
        return;
    };
    let a = node.pod("a");
    let ca = DevCa::new(&node.tmp().join("ca"));
    let good = ca.issue(&id("a"), &node.tmp().join("good"), false);
    let other = ca.issue(&id("x"), &node.tmp().join("other"), false);
    let bad = node.tmp().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("garbage.pem"), "hello, not PEM").unwrap();
    let cases = [
        (
            format!(
                "cert = \"{}/missing.pem\"\nkey = \"{}\"\nbundle = \"{}\"",
                bad.display(),
                good.key().display(),
                good.bundle().display()
            ),
            "missing.pem",
        ),
        (
            format!(
                "cert = \"{}/garbage.pem\"\nkey = \"{}\"\nbundle = \"{}\"",
                bad.display(),
                good.key().display(),
                good.bundle().display()
            ),
            "no CERTIFICATE block",
        ),
        (
            format!(
                "cert = \"{}\"\nkey = \"{}\"\nbundle = \"{}\"",
                good.cert().display(),
                other.key().display(),
                good.bundle().display()
            ),
            "does not match",
        ),
        (
            format!(
                "cert = \"{}\"\nkey = \"{}/garbage.pem\"\nbundle = \"{}\"",
                good.cert().display(),
                bad.display(),
                good.bundle().display()
            ),
            "no PEM private key",
        ),
    ];
    for (lines, needle) in cases {
        let cfg = mesh(&node).pod_extra(a, "open", &lines);
        let path = node.tmp().join("agent.toml");
        std::fs::write(&path, cfg.text()).unwrap();
        let out = Command::new(workspace_bin("agent"))
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .expect("run agent");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "agent started with a bad identity ({needle})"
        );
        assert!(
            err.contains("pod a: identity") && err.contains(needle),
            "expected {needle:?} in: {err}"
        );
        assert!(
            simnode::attached_programs(&a.cgroup).is_empty(),
            "nothing may stay attached"
        );
    }
}

#[test]
fn outbound_to_a_mesh_destination_without_mtls_fails_in_strict_and_downgrades_loudly_in_permissive()
{
    let Some(node) = node("outbound_strict_vs_permissive", &["s", "p", "c"]) else {
        return;
    };
    let (s, p, c) = (node.pod("s"), node.pod("p"), node.pod("c"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let ss = ca.issue(&id("s"), &node.tmp().join("s"), false);
    let sp = ca.issue(&id("p"), &node.tmp().join("p"), false);
    // Pod c is inside the mesh networks but not enrolled: it answers only plaintext.
    let _srv = c.serve(&[8080]);
    let cfg = mesh(&node)
        .pod_extra(s, "open", &format!("mode = \"strict\"\n{}", ss.toml()))
        .pod_extra(p, "open", &format!("mode = \"permissive\"\n{}", sp.toml()));
    let mut agent = Agent::start(&cfg);
    let to = at(c, false, 8080);
    assert_eq!(s.client(to, &[]).ok, 0, "STRICT sent plaintext to the mesh");
    let r = access(&agent, "s", "outbound", |_| true);
    assert_eq!(r["outcome"], "tls_handshake_failed", "{r}");
    let r = p.client(to, &[]);
    assert!(one(&r).ok(), "PERMISSIVE did not fall back: {r:?}");
    let rec = access(&agent, "p", "outbound", |e| e["outcome"] == "ok");
    assert_eq!(rec["tls"], "none");
    agent.wait_for(
        "downgrade warning",
        |e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("downgraded to plaintext"))
                && e["pod"] == "p"
        },
        WAIT,
    );
    assert!(agent.stop().success());
    assert_eq!(proxy_counter(&agent, "outbound_downgraded_to_plaintext"), 1);
}
