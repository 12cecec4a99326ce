//! Operating the agent: every inspection command against a running agent in both output
//! formats, `agent maps` with the daemon stopped, the metrics page through a real
//! Prometheus text parser, the root-only admin socket, and the JSON access log.

mod common;

use std::{os::unix::process::CommandExt, process::Command, time::Duration};

use common::*;
use serde_json::Value;
use simnode::{pki::DevCa, workspace_bin, Agent, AgentConfig, Node};

const TD: &str = "spiffe://td.test/ns/default/sa";

/// Runs an inspection command against the node's agent; returns (exit code, stdout, stderr).
fn cli(node: &Node, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_bin("agent"))
        .args(args)
        .arg("--socket")
        .arg(node.admin_socket())
        .output()
        .expect("run agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(node: &Node, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.extend(["-o", "json"]);
    let (code, out, err) = cli(node, &full);
    assert_eq!(code, 0, "agent {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("agent {args:?} -o json: {e}: {out}"))
}

fn table(node: &Node, args: &[&str]) -> String {
    let (code, out, err) = cli(node, args);
    assert_eq!(code, 0, "agent {args:?}: {err}");
    out
}

fn setup(node: &Node) -> AgentConfig {
    let (a, b) = (node.pod("a"), node.pod("b"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let sa = ca.issue(&format!("{TD}/a"), &node.tmp().join("a"), false);
    let sb = ca.issue(&format!("{TD}/b"), &node.tmp().join("b"), false);
    let policy = node.tmp().join("b-policy.yaml");
    std::fs::write(
        &policy,
        format!("default: deny\nrules:\n  - name: allow-a\n    action: allow\n    from: {{ identities: [\"{TD}/a\"] }}\n    to: {{ ports: [8080] }}\n"),
    )
    .unwrap();
    AgentConfig::new(node)
        .mesh()
        .pod_extra(a, "open", &sa.toml())
        .pod_extra(b, "closed", &sb.toml_strict(&policy))
}

#[test]
fn every_inspection_command_against_a_running_agent() {
    let Some(node) = node("inspection_cli", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    let mut agent = Agent::start(&setup(&node));
    // One connection held open while we look, one finished before.
    assert!(only(&a.client(at(b, false, 8080), &[]).results).ok());
    // Long enough for seven CLI calls, which take 0.2-0.5 s each under emulation.
    let hold = simnode::time::scaled(Duration::from_millis(2500));
    let held = a.client_spawn(
        at(b, false, 8080),
        &["--hold-ms", &hold.as_millis().to_string()],
    );
    std::thread::sleep(simnode::time::scaled(Duration::from_millis(500)));

    let status = json(&node, &["status"]);
    assert_eq!(status["ready"], true);
    assert_eq!(status["pods"].as_array().unwrap().len(), 2);
    assert!(status["pods"][1]["programs"]
        .to_string()
        .contains("sk_lookup"));
    assert!(table(&node, &["status"]).contains("sk_lookup"));
    // What the kernel was probed for at start: every program type, map type and helper
    // per program type the agent uses, each with the release that brought it.
    let features = status["kernel"]["features"]
        .as_array()
        .expect("probed features");
    for (name, need) in [
        ("sk_lookup programs", "required"),
        ("SOCKHASH maps", "required"),
        ("bpf_get_netns_cookie in sock_ops programs", "splice"),
        ("bpf_sk_assign in sk_lookup programs", "required"),
    ] {
        let f = features
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("{name} not probed: {features:?}"));
        assert_eq!(f["need"], need, "{f}");
        assert!(
            f["since"]
                .as_str()
                .is_some_and(|v| v.starts_with(['4', '5'])),
            "{f}"
        );
    }
    assert!(
        features
            .iter()
            .all(|f| f["need"] != "required" || f["available"] == true),
        "the agent runs although a feature it requires is missing: {features:?}"
    );
    // Only what the splice needs may be missing (kernels before 5.15), and then status says
    // the splice is off.
    let present = features.iter().filter(|f| f["available"] == true).count();
    let line = table(&node, &["status"]);
    let probed = format!("({present} of {} features probed present", features.len());
    assert!(line.contains(&probed), "{line}");
    let splice = status["kernel"]["splice"].as_str().expect("splice state");
    if present == features.len() {
        assert_eq!(splice, "available", "{status}");
    } else {
        assert!(splice.starts_with("unavailable: "), "{status}");
        assert!(line.contains("splice unavailable: "), "{line}");
    }
    // What was loaded follows: the splice's programs only where the kernel runs them.
    let loaded = status["kernel"]["programs_loaded"]
        .as_array()
        .expect("programs loaded");
    assert!(loaded.iter().any(|p| p == "sk_lookup"), "{loaded:?}");
    assert_eq!(
        loaded.iter().any(|p| p == "sk_msg (splice)"),
        splice == "available",
        "{status}"
    );

    let pods = json(&node, &["pods"]);
    let pb = pods
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "b")
        .unwrap();
    assert_eq!(pb["identity"], format!("{TD}/b"));
    assert_eq!(pb["mode"], "strict");
    assert!(pb["policy"].as_str().unwrap().ends_with("b-policy.yaml"));
    assert!(table(&node, &["pods"]).contains(&b.ip4.to_string()));

    let conns = json(&node, &["conns"]);
    let live_in = conns
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["pod"] == "b" && c["direction"] == "inbound")
        .unwrap_or_else(|| panic!("the held connection is not listed: {conns}"));
    assert_eq!(live_in["peer_identity"], format!("{TD}/a"));
    assert_eq!(live_in["policy_rule"], "allow-a");
    assert_eq!(live_in["state"], "open");
    let only_b = json(&node, &["conns", "--pod", "b"]);
    assert!(only_b.as_array().unwrap().iter().all(|c| c["pod"] == "b"));
    assert!(table(&node, &["conns"]).contains("allow-a"));

    let certs = json(&node, &["certs"]);
    assert_eq!(certs.as_array().unwrap().len(), 2);
    assert!(certs[0]["expires_in_seconds"].as_i64().unwrap() > 0);
    assert!(table(&node, &["certs"]).contains(&format!("{TD}/a")));

    let policy = json(&node, &["policy", "show"]);
    let pb = policy
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pod"] == "b")
        .unwrap();
    assert_eq!(
        (pb["default"].as_str(), pb["rules"][0].as_str()),
        (Some("deny"), Some("allow-a"))
    );
    assert!(table(&node, &["policy", "show"]).contains("allow-a"));

    // explain, by the client address the agent saw (the outbound leg's source) and by id.
    let key = live_in["src"].as_str().unwrap().to_string();
    let text = table(&node, &["explain", &key]);
    assert!(
        text.contains("sk_lookup")
            && text.contains(&format!("{TD}/a"))
            && text.contains("`allow-a`"),
        "{text}"
    );
    let by_id = json(&node, &["explain", &live_in["id"].to_string()]);
    assert_eq!(by_id["connection"]["src"], key);
    assert_eq!(
        by_id["other_leg"]["direction"], "outbound",
        "both legs: {by_id}"
    );
    assert!(
        text.contains("other leg") && text.contains("cgroup/connect4"),
        "{text}"
    );
    assert_eq!(
        cli(&node, &["explain", "192.0.2.1:9"]).0,
        1,
        "unknown connection: exit 1"
    );

    // Runtime log level.
    assert!(table(&node, &["log-level", "debug"]).contains("debug"));
    agent.wait_for(
        "log level change",
        |e| e["message"] == "log level changed through the admin API",
        WAIT,
    );

    // Runtime log format: human, then back to JSON.
    assert!(table(&node, &["log-format", "human"]).contains("human"));
    assert!(only(&a.client(at(b, false, 8080), &[]).results).ok());
    let human = |agent: &Agent| {
        agent
            .log_text()
            .lines()
            .any(|l| !l.starts_with('{') && l.contains("connection closed"))
    };
    agent.wait_for("a human-format access line", |_| human(&agent), WAIT);
    assert!(table(&node, &["log-format", "json"]).contains("json"));
    assert_eq!(
        cli(&node, &["log-format", "xml"]).0,
        5,
        "bad format refused"
    );
    let held = simnode::client_result(held);
    assert!(only(&held.results).ok());
    let closed = json(&node, &["explain", &key]);
    let closed = &closed["connection"];
    assert_eq!(
        (closed["state"].as_str(), closed["outcome"].as_str()),
        (Some("closed"), Some("ok"))
    );

    // The access log: one JSON line per connection with the fields explain shows.
    let rec = agent.wait_for(
        "access record",
        |e| e["target"] == "access" && e["pod"] == "b",
        WAIT,
    );
    for f in [
        "conn",
        "pod",
        "direction",
        "src",
        "dst",
        "via",
        "tls",
        "peer_identity",
        "peer_serial",
        "policy_rule",
        "bytes_sent",
        "bytes_received",
        "duration_ms",
        "outcome",
        "timestamp",
    ] {
        assert!(rec.get(f).is_some(), "access record lacks {f}: {rec}");
    }

    // maps: live, then with the daemon stopped (b is fail-closed: its maps stay pinned).
    let pins = node.pin_root().to_string_lossy().into_owned();
    let maps = |node: &Node| -> (i32, Value) {
        let _ = node;
        let out = Command::new(workspace_bin("agent"))
            .args(["maps", "--pin-root", &pins, "-o", "json"])
            .output()
            .expect("agent maps");
        let code = out.status.code().unwrap_or(-1);
        (
            code,
            serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        )
    };
    let (code, live) = maps(&node);
    assert_eq!(code, 0);
    assert_eq!(live["POD_CONFIG"].as_array().unwrap().len(), 2);
    assert!(live["COUNTERS"]["redirected"].as_u64().unwrap() >= 2);
    assert!(live["POD_ADDRS"].to_string().contains(&b.ip4.to_string()));
    let out = Command::new(workspace_bin("agent"))
        .args(["maps", "--pin-root", &pins])
        .output()
        .expect("agent maps");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("POD_ADDRS")
            && text.contains(&b.ip4.to_string())
            && text.contains("redirected"),
        "{text}"
    );
    assert!(agent.stop().success());
    assert_eq!(cli(&node, &["status"]).0, 3, "daemon down: exit 3");
    let (code, down) = maps(&node);
    assert_eq!(code, 0, "agent maps must work with the daemon stopped");
    assert!(down["POD_CONFIG"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["blocked"] == true));
    uninstall(&node);
    assert_eq!(maps(&node).0, 3, "nothing pinned after uninstall");
}

#[test]
fn the_metrics_page_parses_and_counts_the_traffic() {
    let Some(node) = node("metrics_page", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080, 9090]);
    let tcp = free_loopback_port();
    let mut agent = Agent::start(&setup(&node).set(&format!("admin_tcp = \"127.0.0.1:{tcp}\"")));
    let r = a.client(at(b, false, 8080), &["--count", "5", "--concurrency", "1"]);
    assert_eq!(r.ok, 5);
    assert_eq!(a.client(at(b, false, 9090), &[]).ok, 0, "denied by policy");
    agent.wait_for("7 closed", |_| agent.access().len() >= 7, WAIT);

    let (code, text, err) = cli(&node, &["metrics"]);
    assert_eq!(code, 0, "{err}");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{text}"));
    let value = |name: &str, labels: &[(&str, &str)]| sum(&scrape, name, labels);
    assert_eq!(
        value(
            "agent_connections_opened_total",
            &[("direction", "outbound")]
        ),
        6.0
    );
    assert_eq!(
        value(
            "agent_connections_opened_total",
            &[("direction", "inbound")]
        ),
        6.0
    );
    assert_eq!(
        value(
            "agent_connections_closed_total",
            &[("direction", "inbound"), ("outcome", "ok")]
        ),
        5.0
    );
    assert_eq!(
        value(
            "agent_connections_closed_total",
            &[("direction", "inbound"), ("outcome", "denied")]
        ),
        1.0
    );
    assert_eq!(value("agent_connections_active", &[]), 0.0);
    assert_eq!(
        value(
            "agent_authz_decisions_total",
            &[("pod", "b"), ("decision", "allow"), ("rule", "allow-a")]
        ),
        5.0
    );
    assert_eq!(
        value(
            "agent_authz_decisions_total",
            &[("pod", "b"), ("decision", "deny"), ("rule", "default deny")]
        ),
        1.0
    );
    assert!(value("agent_ebpf_events_total", &[("event", "redirected")]) >= 6.0);
    assert!(value("agent_ebpf_events_total", &[("event", "inbound_steered")]) >= 6.0);
    assert!(
        value(
            "agent_bytes_total",
            &[("direction", "inbound"), ("flow", "sent")]
        ) >= 5.0 * 5.0
    );
    let hs = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "agent_tls_handshake_duration_seconds"
                && s.labels.get("direction") == Some("inbound")
        })
        .expect("handshake histogram");
    match &hs.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert_eq!(
                buckets.last().map(|b| b.count),
                Some(6.0),
                "6 inbound handshakes"
            )
        }
        other => panic!("not a histogram: {other:?}"),
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        value(
            "agent_certificate_expiry_timestamp_seconds",
            &[("pod", "b")]
        ) > now
    );
    assert_eq!(
        value(
            "agent_reloads_total",
            &[("pod", "b"), ("kind", "policy"), ("result", "rejected")]
        ),
        0.0
    );
    // The optional loopback TCP port serves metrics and health, and nothing else.
    assert!(http_get(tcp, "/metrics").contains("agent_connections_opened_total"));
    assert!(http_get(tcp, "/readyz").starts_with("HTTP/1.1 200"));
    assert!(http_get(tcp, "/conns").starts_with("HTTP/1.1 403"));
    assert!(agent.stop().success());
    uninstall(&node);
}

#[test]
fn the_admin_socket_refuses_non_root_clients() {
    let Some(node) = node("admin_socket_root_only", &["a", "b"]) else {
        return;
    };
    let mut agent = Agent::start(&setup(&node));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node.admin_socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the socket must be root-only");
    let as_nobody = |node: &Node| {
        let out = Command::new(workspace_bin("agent"))
            .args(["status", "--socket"])
            .arg(node.admin_socket())
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run as nobody");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The directory is the test's temp dir; let nobody reach the socket file itself.
    std::fs::set_permissions(node.tmp(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, err) = as_nobody(&node);
    assert_eq!(code, 4, "file permissions: {err}");
    assert!(err.contains("root-only"), "{err}");
    // Even with the file opened up, the peer-credential check refuses.
    std::fs::set_permissions(node.admin_socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, err) = as_nobody(&node);
    assert_eq!(code, 4, "peer credentials: {err}");
    assert!(err.contains("root-only"), "{err}");
    agent.wait_for(
        "refusal log",
        |e| e["message"] == "admin API: refused a non-root client",
        WAIT,
    );
    assert!(agent.stop().success());
    uninstall(&node);
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP/1.1 GET on loopback (the admin TCP port).
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("admin TCP port");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn shell_completions_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(workspace_bin("agent"))
            .args(["completions", shell])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("explain") && text.contains("conns"),
            "{shell}"
        );
    }
}
