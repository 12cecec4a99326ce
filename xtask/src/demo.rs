//! `cargo xtask demo`: a two-pod simulated node, both pods enrolled with SPIFFE identities,
//! and a plain account of what the agent did with each connection.

use std::{net::SocketAddr, time::Duration};

use anyhow::{ensure, Result};
use serde_json::Value;
use simnode::{pki::DevCa, proto::ConnResult, Agent, AgentConfig, Enrol, Node};

const EXCLUDED_PORT: u16 = 9100;
const TD: &str = "spiffe://demo.local/ns/default/sa";

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
        println!("  pod {:<7} {} / {}", p.name, p.ip4, p.ip6);
    }
    let _srv = server.serve(&[8080, EXCLUDED_PORT]);
    println!(
        "  a plain TCP server (no TLS code) runs in pod `server` on ports 8080 and {EXCLUDED_PORT}"
    );

    let ca = DevCa::named(&node.tmp().join("ca"), "demo.local");
    let ids = [
        ca.issue(&format!("{TD}/client"), &node.tmp().join("client"), false),
        ca.issue(&format!("{TD}/server"), &node.tmp().join("server"), false),
    ];
    println!("  `agent ca` issued SVIDs {TD}/client and {TD}/server");

    let policy = node.tmp().join("server-policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "default: deny\nrules:\n  - name: client-may-call-8080\n    action: allow\n    \
             from: {{ identities: [\"{TD}/client\"] }}\n    to: {{ ports: [8080] }}\n"
        ),
    )?;
    println!("  pod `server`'s policy: default deny; allow {TD}/client to port 8080");
    let cfg = AgentConfig::new(&node).mesh().pod_extra(
        client,
        "open",
        &format!("exclude_ports = [{EXCLUDED_PORT}]\n{}", ids[0].toml()),
    );
    let mut agent = Agent::start(&cfg);
    println!("\nAgent started with pod `client` from its config file.");
    let enrol = Enrol::pod(server)
        .strict(&ids[1])
        .fail_mode("closed")
        .arg("--exclude-inbound-port", EXCLUDED_PORT.to_string())
        .arg("--policy", &policy);
    let out = agent.enroll(&enrol);
    ensure!(
        out.code == Some(0),
        "agent enroll failed: {}",
        out.stderr.trim()
    );
    println!(
        "Pod `server` enrolled at runtime: `agent enroll --name server --netns ... --cgroup ...\n\
         --identity-dir ... --mode strict --fail-mode closed --exclude-inbound-port {EXCLUDED_PORT}\n\
         --policy ...` -> {}",
        out.stdout.trim()
    );
    println!(
        "Per pod: connect4/connect6/sock_ops on its cgroup (outbound), sk_lookup on its netns\n\
         (inbound), listeners inside the pod. Pod `server` is STRICT: only mutual TLS. Port\n\
         {EXCLUDED_PORT} is excluded on both sides. The applications are unmodified.\n"
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
        println!("[{}] app in pod `client` dials {to} ({label})", i + 1);
        describe(&summary.results[0], &agent, *to);
    }
    let to = SocketAddr::new(server.ip(false), 8080);
    let outsider = node.host_client(to, &[]);
    println!("[4] a plaintext client on the node itself (outside the mesh) dials {to}");
    match outsider.results.first().and_then(|r| r.error.as_ref()) {
        Some(e) => println!("    app:    failed, as it should: {e}"),
        None => println!("    app:    UNEXPECTEDLY SUCCEEDED"),
    }
    if let Some(e) = find(&agent, |e| {
        e["pod"] == "server" && e["outcome"] == "refused"
    }) {
        println!(
            "    agent:  refused at pod `server`: {}\n",
            e["reason"].as_str().unwrap_or("?")
        );
    }

    ensure!(agent.stop().success(), "the agent did not stop cleanly");
    let event = agent.wait_for(
        "kernel counters",
        |e| e["message"] == "kernel counters",
        Duration::from_secs(5),
    );
    let counters: Value = serde_json::from_str(event["counters"].as_str().unwrap_or("{}"))?;
    println!(
        "Kernel counters (per-CPU maps): connects redirected={} excluded={}, inbound steered={} excluded={}",
        counters["redirected"], counters["excluded_port"], counters["inbound_steered"], counters["inbound_excluded"]
    );
    println!(
        "Agent stopped on SIGTERM: drained; `client` (fail-open) has nothing attached, `server`"
    );
    println!("(fail-closed) keeps only its blocking programs pinned. Removing those now.");
    drop(node);
    println!("Node torn down: pins, namespaces, veths, bridge, cgroups removed.\n");
    Ok(())
}

fn find(agent: &Agent, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(e) = agent.access().into_iter().find(|e| pred(e)) {
            return Some(e);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn describe(r: &ConnResult, agent: &Agent, to: SocketAddr) {
    let verified = if r.sent_ok && r.reply_ok {
        "both checksums verified"
    } else {
        "BYTES DIFFER"
    };
    match &r.error {
        Some(e) => println!("    app:    FAILED: {e}"),
        None => println!("    app:    ok, {verified}; its own socket is {}", r.local),
    }
    if let Some(s) = &r.server {
        println!("    server: saw {} bytes from {}", s.got, s.peer);
    }
    let local: Option<SocketAddr> = r.local.parse().ok();
    let redirected = local.is_some_and(|l| l.ip().to_canonical().is_loopback());
    let out = redirected
        .then(|| {
            find(agent, |e| {
                e["direction"] == "outbound"
                    && e["dst"] == to.to_string()
                    && e["src"]
                        .as_str()
                        .and_then(|s| s.parse::<SocketAddr>().ok())
                        .map(|s| s.port())
                        == local.map(|l| l.port())
            })
        })
        .flatten();
    let Some(out) = out else {
        println!("    agent:  not involved (went direct, as configured)\n");
        return;
    };
    println!(
        "    client side: intercepted by connect(); original destination {}; {} to {}",
        out["dst"].as_str().unwrap_or("?"),
        out["tls"].as_str().unwrap_or("?"),
        out["peer_identity"].as_str().unwrap_or("?"),
    );
    let via = out["via"].clone();
    if let Some(inb) = find(agent, |e| e["direction"] == "inbound" && e["src"] == via) {
        println!(
            "    server side: steered by sk_lookup; {} from {}; allowed by `{}`;\n                 to the app from {}; {} B in, {} B out, {} ms",
            inb["tls"].as_str().unwrap_or("?"),
            inb["peer_identity"].as_str().unwrap_or("?"),
            inb["policy_rule"].as_str().unwrap_or("?"),
            inb["via"].as_str().unwrap_or("?"),
            inb["bytes_sent"],
            inb["bytes_received"],
            inb["duration_ms"],
        );
    }
    println!();
}
