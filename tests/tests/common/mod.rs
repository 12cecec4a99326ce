//! Helpers shared by the privileged test files.
#![allow(dead_code, reason = "each test file uses its own subset")]

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use simnode::{pki::DevCa, proto::ConnResult, require_root, Agent, AgentConfig, Node, Pod};

pub const WAIT: Duration = Duration::from_secs(20);

pub fn node(test: &str, pods: &[&str]) -> Option<Node> {
    require_root(test).then(|| Node::new(pods))
}

pub fn at(pod: &Pod, v6: bool, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ip(v6), port)
}

pub fn sock(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("not a socket address {s:?}: {e}"))
}

/// The client socket's own address is on loopback exactly when the kernel redirected it.
pub fn redirected(r: &ConnResult) -> bool {
    sock(&r.local).ip().to_canonical().is_loopback()
}

pub fn only(results: &[ConnResult]) -> &ConnResult {
    assert_eq!(results.len(), 1, "expected one result: {results:?}");
    let r = &results[0];
    assert!(r.ok(), "connection failed: {r:?}");
    r
}

/// Addresses compared as the kernel means them: `::ffff:a.b.c.d` is `a.b.c.d`.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (sock(a), sock(b));
    a.ip().to_canonical() == b.ip().to_canonical() && a.port() == b.port()
}

/// Waits for the agent's access record of the connection to `dst` from client `src`.
pub fn record(agent: &Agent, src: &str, dst: SocketAddr) -> Value {
    agent.wait_for(
        &format!("access record {src} -> {dst}"),
        |e| {
            e["target"] == "access"
                && e["src"].as_str().is_some_and(|s| same(s, src))
                && e["dst"] == dst.to_string()
        },
        WAIT,
    )
}

pub fn records_to(agent: &Agent, dst: SocketAddr) -> usize {
    agent
        .access()
        .iter()
        .filter(|e| e["dst"] == dst.to_string())
        .count()
}

/// Probes every 20 ms until `done` holds or `timeout` (scaled for slow machines) passes,
/// and returns the last value seen: the caller asserts on it, so a timeout fails with
/// what the state was.
pub fn settle<T>(timeout: Duration, mut probe: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = std::time::Instant::now() + simnode::time::scaled(timeout);
    loop {
        let v = probe();
        if done(&v) || std::time::Instant::now() >= deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sum of one metric's samples whose labels include `labels`, from `agent metrics`.
pub fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    let out = agent.cli(&["metrics"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let scrape = prometheus_parse::Scrape::parse(out.stdout.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not Prometheus text: {e}"));
    sum(&scrape, name, labels)
}

/// The sum of one metric's samples in `scrape` whose labels include `labels`.
pub fn sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// The "kernel counters" line the agent logs when it stops.
pub fn counter(agent: &Agent, name: &str) -> u64 {
    let e = agent.wait_for(
        "kernel counters",
        |e| e["message"] == "kernel counters",
        WAIT,
    );
    let counters: Value = serde_json::from_str(e["counters"].as_str().expect("counters field"))
        .expect("counters are JSON");
    counters[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {counters}"))
}

/// `agent uninstall` for the node's pin root: removes what fail-closed pods left pinned.
pub fn uninstall(node: &Node) -> String {
    let out = std::process::Command::new(simnode::workspace_bin("agent"))
        .args(["uninstall", "--pin-root"])
        .arg(node.pin_root())
        .arg("--state-dir")
        .arg(node.state_dir())
        .output()
        .expect("agent uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Connections in one burst of [`mtls_burst`].
pub const BURST: usize = 2000;

/// What a burst did: the client's summary and the agent's account of it.
pub struct Burst {
    pub summary: simnode::proto::Summary,
    /// Access records that did not end `ok` (at most five).
    pub refusals: Vec<Value>,
    pub records: usize,
}

impl Burst {
    pub fn assert_all_ok(&self) {
        assert_eq!(
            self.summary.failed, 0,
            "errors: {:?}; {} access records; agent refusals: {:#?}",
            self.summary.errors, self.records, self.refusals
        );
        assert_eq!(self.summary.ok as usize, BURST);
    }
}

/// [`BURST`] simultaneous connects from pod a to pod b (both STRICT, fail-closed, with the
/// shipped detection timeout of 1 s and `pod_extra` lines for both pods); prints how long
/// it took and the slowest handshake. The agent is stopped and the pins removed.
pub fn mtls_burst(node: &Node, pod_extra: &str) -> Burst {
    let (a, b) = (node.pod("a"), node.pod("b"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let td = "spiffe://td.test/ns/default/sa";
    let sa = ca.issue(&format!("{td}/a"), &node.tmp().join("a"), false);
    let sb = ca.issue(&format!("{td}/b"), &node.tmp().join("b"), false);
    let _srv = b.serve(&[8080]);
    let cfg = AgentConfig::new(node)
        .mesh()
        .set("protocol_detect_timeout_ms = 1000")
        .log_level("info")
        .pod_extra(
            a,
            "closed",
            &format!("mode = \"strict\"\n{pod_extra}\n{}", sa.toml()),
        )
        .pod_extra(
            b,
            "closed",
            &format!("mode = \"strict\"\n{pod_extra}\n{}", sb.toml()),
        );
    let mut agent = Agent::start(&cfg);
    let started = std::time::Instant::now();
    let count = BURST.to_string();
    let summary = a.client(
        at(b, false, 8080),
        &[
            "--count",
            &count,
            "--concurrency",
            &count,
            "--send",
            "64",
            "--reply",
            "64",
        ],
    );
    let elapsed = started.elapsed();
    // Every connection has two records (both legs); wait for the last of them.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while agent.access().len() < 2 * BURST && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let access = agent.access();
    let handshakes: Vec<u64> = access
        .iter()
        .filter(|e| e["direction"] == "outbound")
        .filter_map(|e| e["handshake_ms"].as_u64())
        .collect();
    println!(
        "burst of {BURST}: {} ok, {} failed in {elapsed:?}; slowest outbound handshake {} ms ({} measured)",
        summary.ok,
        summary.failed,
        handshakes.iter().max().copied().unwrap_or(0),
        handshakes.len()
    );
    let burst = Burst {
        refusals: access
            .iter()
            .filter(|e| e["outcome"] != "ok")
            .take(5)
            .cloned()
            .collect(),
        records: access.len(),
        summary,
    };
    assert!(agent.stop().success());
    uninstall(node);
    burst
}
