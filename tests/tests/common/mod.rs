//! Helpers shared by the privileged test files.
#![allow(dead_code, reason = "each test file uses its own subset")]

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use simnode::{proto::ConnResult, require_root, Agent, Node, Pod};

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
        .output()
        .expect("agent uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
