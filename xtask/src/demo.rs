//! `cargo xtask demo`: a two-pod simulated node, the agent intercepting the client pod's
//! traffic, and a plain account of what happened.

use std::net::SocketAddr;

use anyhow::{ensure, Result};
use serde_json::Value;
use simnode::{proto::ConnResult, Agent, AgentConfig, Node};

const EXCLUDED_PORT: u16 = 9100;

pub fn sweep_stale() {
    for what in simnode::sweep_stale() {
        println!("removed a leftover of a crashed run: {what}");
    }
}

pub fn run() -> Result<()> {
    sweep_stale();
    let node = Node::new(&["client", "server"]);
    let (client, server) = (node.pod("client"), node.pod("server"));
    println!(
        "\nSimulated node {}: two pods on a bridge, each with its own netns and cgroup v2",
        node.id
    );
    for p in [client, server] {
        println!(
            "  pod {:<7} {} / {}   cgroup {}",
            p.name,
            p.ip4,
            p.ip6,
            p.cgroup.display()
        );
    }
    let _srv = server.serve(&[8080, EXCLUDED_PORT]);
    println!("  a plain TCP server runs in pod `server` on ports 8080 and {EXCLUDED_PORT}");

    let cfg = AgentConfig::new(&node).pod_with(client, "open", &[EXCLUDED_PORT], &[]);
    let mut agent = Agent::start(&cfg);
    println!(
        "\nAgent started: eBPF connect4/connect6/sock_ops attached to pod `client`'s cgroup,\n\
         outbound listener on 127.0.0.1:15001 and [::1]:15001 inside the pod, port {EXCLUDED_PORT} excluded.\n\
         The client application is unmodified: it dials the server's real address.\n"
    );

    let cases: [(&str, SocketAddr, &[&str]); 3] = [
        (
            "IPv4",
            SocketAddr::new(server.ip(false), 8080),
            &["--send", "65536", "--reply", "1048576"],
        ),
        (
            "IPv6",
            SocketAddr::new(server.ip(true), 8080),
            &["--send", "65536", "--reply", "1048576"],
        ),
        (
            "excluded port",
            SocketAddr::new(server.ip(false), EXCLUDED_PORT),
            &["--send", "1000", "--reply", "1000"],
        ),
    ];
    for (i, (label, to, args)) in cases.iter().enumerate() {
        let summary = client.client(*to, args);
        ensure!(summary.results.len() == 1, "client printed no result");
        let r = &summary.results[0];
        println!("[{}] app in pod `client` dials {to} ({label})", i + 1);
        describe(r, &agent, *to);
    }

    ensure!(agent.stop().success(), "the agent did not stop cleanly");
    let event = agent.wait_for(
        "kernel counters",
        |e| e["message"] == "kernel counters",
        std::time::Duration::from_secs(5),
    );
    let counters: Value = serde_json::from_str(event["counters"].as_str().unwrap_or("{}"))?;
    println!(
        "Kernel counters (per-CPU map, summed): redirected={} excluded_port={} original-destination records={}",
        counters["redirected"], counters["excluded_port"], counters["orig_recorded"]
    );
    println!("Agent stopped on SIGTERM: drained, detached its programs (the pod is fail-open).");
    drop(node);
    println!("Node torn down: namespaces, veths, bridge, cgroups removed.\n");
    Ok(())
}

fn describe(r: &ConnResult, agent: &Agent, to: SocketAddr) {
    let verified = if r.sent_ok && r.reply_ok {
        "both checksums verified"
    } else {
        "BYTES DIFFER"
    };
    match &r.error {
        Some(e) => println!("    app:    FAILED: {e}"),
        None => println!("    app:    ok, {verified}; its socket is {}", r.local),
    }
    if let Some(s) = &r.server {
        println!(
            "    server: saw the connection from {} and {} bytes",
            s.peer, s.got
        );
    }
    let local: Option<SocketAddr> = r.local.parse().ok();
    let rec = local.and_then(|l| wait_record(agent, l, to));
    match rec {
        Some(e) => println!(
            "    agent:  intercepted; original destination {}, proxied from {}, {} B up / {} B down, {} ms, outcome {}\n",
            e["dst"].as_str().unwrap_or("?"),
            e["via"].as_str().unwrap_or("?"),
            e["bytes_sent"],
            e["bytes_received"],
            e["duration_ms"],
            e["outcome"].as_str().unwrap_or("?")
        ),
        None => println!("    agent:  not involved (went direct, as configured)\n"),
    }
}

/// The access record of this connection, if the agent proxied it.
fn wait_record(agent: &Agent, local: SocketAddr, to: SocketAddr) -> Option<Value> {
    if !local.ip().to_canonical().is_loopback() {
        return None;
    }
    let matches = |e: &Value| {
        e["target"] == "access"
            && e["dst"] == to.to_string()
            && e["src"]
                .as_str()
                .and_then(|s| s.parse::<SocketAddr>().ok())
                .is_some_and(|s| s.port() == local.port())
    };
    Some(agent.wait_for("access record", matches, std::time::Duration::from_secs(10)))
}
