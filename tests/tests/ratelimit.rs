//! Rate limits and flood protection on a simulated node: an HTTP rule's token bucket per
//! peer identity answers 429 with Retry-After at the configured rate (within 20%) while
//! another identity is served in full; a pod's own limits refuse one source's connections
//! past its concurrency and its connection rate while another source is served; requests
//! over the pod's header count or body size are refused before the application sees them.

mod common;

use std::{net::SocketAddr, time::Duration};

use agent::{ratelimit::KeyClass, spec::LimitsRequest};
use common::*;
use simnode::{app::client_result, pki::DevCa, Agent, AgentConfig};

const TD: &str = "spiffe://td.test/ns/default/sa";

/// Low enough that a slow guest (where one request through both agents took 45 ms) still
/// offers well over it; high enough that one token is a few percent of what is measured.
const RATE: f64 = 8.0;
const BURST: u64 = 3;

fn api_policy() -> String {
    format!(
        r#"
default: deny
rules:
  - name: api
    action: allow
    from: {{ identities: ["{TD}/*"] }}
    to: {{ ports: [8080] }}
    http: {{ paths: ["/*"] }}
    rate_limit: {{ key: identity, per_second: {RATE}, burst: {BURST} }}
"#
    )
}

#[test]
fn an_identity_over_its_request_rate_gets_429_and_another_identity_is_served() {
    let Some(node) = node("ratelimit_http", &["greedy", "polite", "s"]) else {
        return;
    };
    let (greedy, polite, s) = (node.pod("greedy"), node.pod("polite"), node.pod("s"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let svid = |name: &str| ca.issue(&format!("{TD}/{name}"), &node.tmp().join(name), false);
    let (gs, ps, ss) = (svid("greedy"), svid("polite"), svid("s"));
    let policy = node.tmp().join("s-policy.yaml");
    std::fs::write(&policy, api_policy()).unwrap();
    let cfg = AgentConfig::new(&node)
        .mesh()
        .pod_extra(greedy, "closed", &gs.toml())
        .pod_extra(polite, "closed", &ps.toml())
        .pod_extra(s, "closed", &ss.toml_strict(&policy));
    let mut agent = Agent::start(&cfg);
    let app = s.serve_http(&[8080]);
    let to = at(s, false, 8080);

    // greedy offers up to 100 requests a second, for 2 s here; polite 4 a second at the
    // same time, under the limit.
    let (r, polite_r) = std::thread::scope(|scope| {
        let polite_run = scope.spawn(|| {
            let list = ["GET /polite"; 12].join(",");
            polite.http_client_args(to, &list, &["--interval-ms", "250"])
        });
        let list = vec!["GET /greedy"; 200].join(",");
        let r = greedy.http_client_args(to, &list, &["--interval-ms", "10"]);
        (r, polite_run.join().expect("the polite client"))
    });

    assert_eq!(r.error, None, "429s must not close the connection");
    let ok = r.statuses.iter().filter(|s| **s == 200).count() as u64;
    let limited = r.statuses.iter().filter(|s| **s == 429).count() as u64;
    assert_eq!(ok + limited, 200, "{:?}", r.statuses);
    let elapsed = Duration::from_millis(r.elapsed_ms).as_secs_f64();
    let offered = 200.0 / elapsed;
    assert!(
        offered > 1.5 * RATE,
        "the client offered only {offered:.0}/s: too slow to test a {RATE}/s limit"
    );
    // A full bucket's burst, then the rate.
    let admitted = ok.saturating_sub(BURST) as f64 / elapsed;
    assert!(
        (admitted - RATE).abs() <= 0.2 * RATE,
        "{ok} of 200 served in {elapsed:.2} s: {admitted:.1}/s after the burst, limit {RATE}/s"
    );
    for (status, retry) in r.statuses.iter().zip(&r.retry_after) {
        if *status == 429 {
            assert!(
                retry.parse::<u64>().is_ok_and(|s| s >= 1),
                "a 429 without Retry-After: {retry:?}"
            );
        }
    }
    assert!(r
        .bodies
        .iter()
        .any(|b| b.contains("rate limited by rule `api`")));
    assert_eq!(
        polite_r.statuses,
        vec![200; 12],
        "another identity was limited"
    );
    assert_eq!(
        app.wait_http((ok + 12) as usize).len() as u64,
        ok + 12,
        "the app saw a refused request"
    );
    let labels = [
        ("pod", "s"),
        ("scope", "rule"),
        ("rule", "api"),
        ("kind", "requests"),
        ("key", "identity"),
    ];
    assert_eq!(
        metric(&agent, "agent_rate_limited_total", &labels),
        limited as f64
    );
    let record = agent.wait_for(
        "the greedy connection's record",
        |e| e["target"] == "access" && e["http_requests"] == 200,
        WAIT,
    );
    assert_eq!(record["http_rate_limited"], limited, "{record}");
    println!(
        "{ok} of 200 in {elapsed:.2} s ({offered:.0}/s offered): {admitted:.1}/s after a burst of {BURST}, limit {RATE}/s; polite 12/12"
    );
    assert!(agent.stop().success());
}

/// Pod b's `[pod.limits]`: per source address, 5 connections at once and 10 new ones a
/// second (burst 10); on the HTTP port 8081, 8 header fields and 1000 body bytes at most.
fn limits() -> LimitsRequest {
    LimitsRequest {
        key: Some(KeyClass::SourceIp),
        concurrent: Some(5),
        connections_per_second: Some(10.0),
        connection_burst: Some(10),
        ports: vec![8081],
        max_request_headers: Some(8),
        max_request_bytes: Some(1000),
        ..Default::default()
    }
}

/// Waits for `agent_rate_limited_total` of pod b's own limit of `kind` to reach `n`.
fn wait_limited(agent: &Agent, kind: &str, n: f64) {
    let labels = [("pod", "b"), ("scope", "pod"), ("kind", kind)];
    let refused = settle(
        Duration::from_secs(10),
        || metric(agent, "agent_rate_limited_total", &labels),
        |v| *v >= n,
    );
    assert!(refused >= n, "{kind}: {refused} refused, not {n}");
}

#[test]
fn a_pods_limits_refuse_one_source_and_serve_another() {
    let Some(node) = node("ratelimit_pod", &["a", "c", "b"]) else {
        return;
    };
    let (a, c, b) = (node.pod("a"), node.pod("c"), node.pod("b"));
    let policy = node.tmp().join("b-policy.yaml");
    std::fs::write(&policy, "default: all\n").unwrap();
    let mut table = toml::Table::new();
    table.insert("policy".into(), policy.display().to_string().into());
    table.insert("limits".into(), toml::Value::try_from(limits()).unwrap());
    let cfg = AgentConfig::new(&node).pod_table(b, "open", table);
    let mut agent = Agent::start(&cfg);
    let _tcp = b.serve(&[9090]);
    let app = b.serve_http(&[8081]);
    let to: SocketAddr = at(b, false, 9090);

    // a opens 20 at once and holds them: 5 are its share, 15 are refused.
    let held = a.client_spawn(
        to,
        &["--count", "20", "--concurrency", "20", "--hold-ms", "2000"],
    );
    wait_limited(&agent, "concurrent", 15.0);
    // c, another source, is served while a is at its limit.
    let r = c.client(to, &["--count", "5", "--concurrency", "5"]);
    assert_eq!(r.ok, 5, "another source was limited: {:?}", r.errors);
    let held = client_result(held);
    assert_eq!((held.ok, held.failed), (5, 15), "{:?}", held.errors);

    // Once a's bucket is full again (10), 30 connections one after another: the burst
    // and what the rate adds while they run are served (however long that is on this
    // machine), the rest refused.
    std::thread::sleep(Duration::from_millis(1100));
    let start = std::time::Instant::now();
    let r = a.client(to, &["--count", "30"]);
    let most = (10.0 + 10.0 * start.elapsed().as_secs_f64()).ceil() as u64 + 1;
    assert!(
        (10..=most.min(30)).contains(&r.ok),
        "{} of 30 served in {:?} at 10/s, burst 10",
        r.ok,
        start.elapsed()
    );
    if most < 30 {
        assert!(r.ok < 30, "none refused");
    }
    wait_limited(&agent, "connections", (30 - r.ok) as f64);

    // On the HTTP port: too many header fields is a 431, a long body a 413; neither
    // reaches the app, and the connection serves the next request.
    let headers: Vec<String> = (0..10).map(|i| format!("x-h{i}: {i}")).collect();
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    let r = c.http_client_with(at(b, false, 8081), "GET /many", false, &headers);
    assert_eq!(r.statuses, [431], "{:?}", r.bodies);
    let r = c.http_client_args(
        at(b, false, 8081),
        "POST /big,POST /small",
        &["--body-bytes", "2000"],
    );
    assert_eq!(r.statuses, [413, 413], "{:?}", r.bodies);
    let r = c.http_client_args(at(b, false, 8081), "POST /fits", &["--body-bytes", "900"]);
    assert_eq!(r.statuses, [200]);
    // A chunked body (no length up front) is cut off on its way.
    let big = node.tmp().join("big.bin");
    std::fs::write(&big, vec![b'x'; 3000]).unwrap();
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-H", "Transfer-Encoding: chunked", "--data-binary"])
        .arg(format!("@{}", big.display()))
        .arg(format!("http://{}/chunked", at(b, false, 8081)))
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "413", "{out:?}");
    let seen: Vec<(String, usize)> = app
        .seen_http()
        .iter()
        .map(|r| (r.path.clone(), r.body_bytes))
        .collect();
    assert_eq!(
        seen,
        [("/fits".to_string(), 900)],
        "the app saw a refused request"
    );
    let pods = agent.pods();
    let shown = &pods.iter().find(|p| p["name"] == "b").expect("pod b")["limits"];
    assert_eq!(
        shown["connections"]["limit"], "10/s burst 10, 5 at once per source_ip",
        "{shown}"
    );
    assert!(agent.stop().success());
}
