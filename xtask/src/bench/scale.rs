//! `cargo xtask bench --scale`: many proxied mutual TLS connections held open at once, each
//! checked alive at the end, and what they cost the agents in memory.
//!
//! Each connection is an application connection from a client pod to a server pod,
//! carried as mutual TLS between two agents (as between two nodes), so each agent holds two
//! descriptors per connection. These machines cap `RLIMIT_NOFILE` at a hard limit the
//! bench cannot raise (no CAP_SYS_RESOURCE), so the connections are spread over as many
//! (client agent, server agent) pairs as that limit needs, and the report says so.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use simnode::{app::start_server, pki::DevCa, workspace_bin, Agent, AgentConfig, Node};

use super::{first_stderr_json, out_dir, rss_kib};

/// Descriptors an agent keeps for itself (maps, listeners, watches, the runtime), with
/// room to spare.
const AGENT_BASE_FDS: u64 = 2_000;
const RR_PORT: u16 = 7100;

pub struct ScaleOpts {
    pub conns: usize,
    pub hold: Duration,
}

/// The hard open-files limit this process (and so every agent it starts) is held to.
fn nofile_hard() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(1024)
}

pub fn run(opts: &ScaleOpts) -> Result<Value> {
    let hard = nofile_hard();
    let per_agent = hard.saturating_sub(AGENT_BASE_FDS) / 2;
    ensure!(
        per_agent > 0,
        "RLIMIT_NOFILE hard limit {hard} leaves no room for connections: raise it (ulimit -Hn)"
    );
    let shards = opts.conns.div_ceil(per_agent as usize).max(1);
    let per_shard = opts.conns.div_ceil(shards);
    crate::demo::sweep_stale();
    let names: Vec<String> = (0..shards)
        .flat_map(|i| [format!("c{i}"), format!("s{i}")])
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let node = Node::new(&refs);
    let ca = DevCa::named(&node.tmp().join("ca"), "bench.local");
    let mut agents = Vec::new();
    let mut servers = Vec::new();
    for i in 0..shards {
        let (c, s) = (node.pod(&format!("c{i}")), node.pod(&format!("s{i}")));
        let svid = |p: &str| {
            ca.issue(
                &format!("spiffe://bench.local/ns/scale/sa/{p}"),
                &node.tmp().join(p),
                false,
            )
        };
        let (cs, ss) = (svid(&format!("c{i}")), svid(&format!("s{i}")));
        let mut cmd = s.command(workspace_bin("loadgen"));
        cmd.args([
            "serve",
            "--rr",
            &std::net::SocketAddr::new(s.ip(false), RR_PORT).to_string(),
            "--sink",
            &std::net::SocketAddr::new(s.ip(false), RR_PORT + 100).to_string(),
            "--count",
            "1",
            "--size",
            "64",
        ]);
        servers.push(start_server(cmd));
        let client_side = AgentConfig::another(&node, &format!("client-{i}"))
            .mesh()
            .log_level("info,access=warn")
            .pod_extra(c, "open", &cs.toml());
        let server_side = AgentConfig::another(&node, &format!("server-{i}"))
            .mesh()
            .log_level("info,access=warn")
            .pod_extra(s, "open", &ss.toml());
        agents.push(Agent::start_cmd(
            Command::new(workspace_bin("agent")),
            &client_side,
        ));
        agents.push(Agent::start_cmd(
            Command::new(workspace_bin("agent")),
            &server_side,
        ));
    }
    let pids: Vec<u32> = agents.iter().filter_map(Agent::pid).collect();
    let rss_before = rss_kib(&pids);
    let started = Instant::now();
    let mut clients = Vec::new();
    for i in 0..shards {
        let (c, s) = (node.pod(&format!("c{i}")), node.pod(&format!("s{i}")));
        let mut cmd = c.command(workspace_bin("loadgen"));
        cmd.args([
            "idle",
            "--to",
            &std::net::SocketAddr::new(s.ip(false), RR_PORT).to_string(),
            "--conns",
            &per_shard.to_string(),
            "--size",
            "64",
            "--hold-ms",
            &opts.hold.as_millis().to_string(),
        ]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        clients.push(cmd.spawn().context("spawn loadgen idle")?);
    }
    // Each client says on stderr when all its connections are up: measure then.
    for child in &mut clients {
        first_stderr_json(child)?;
    }
    let open_after = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let rss_held = rss_kib(&pids);
    let mut reports = Vec::new();
    for child in clients {
        let out = child.wait_with_output().context("wait loadgen idle")?;
        reports.push(
            serde_json::from_slice::<Value>(&out.stdout)
                .with_context(|| format!("loadgen idle printed {:?}", out.stdout))?,
        );
    }
    let sum = |k: &str| {
        reports
            .iter()
            .map(|r| r[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let (open, alive, errors) = (sum("open"), sum("alive"), sum("errors"));
    let per_conn = rss_held.saturating_sub(rss_before) as f64 / open.max(1) as f64;
    let result = json!({
        "conns": opts.conns, "hold_s": opts.hold.as_secs_f64(), "agents": agents.len(),
        "agent_pairs": shards, "nofile_hard": hard, "open": open, "alive_after_hold": alive,
        "connect_errors": errors, "opened_in_s": open_after.as_secs_f64(),
        "agents_rss_before_kib": rss_before, "agents_rss_held_kib": rss_held,
        "agent_kib_per_conn": per_conn, "first_errors": reports.iter().map(|r| r["first_error"].clone()).collect::<Vec<_>>(),
        "first_lost": reports.iter().map(|r| r["first_lost"].clone()).collect::<Vec<_>>(),
    });
    println!(
        "bench scale: {open} of {} mutual TLS connections open after {:.1} s and held {:.0} s, {alive} alive at the end, {errors} connect errors; {} agents ({} client/server pairs: RLIMIT_NOFILE hard limit {hard} allows {per_agent} connections per agent, which the bench cannot raise without CAP_SYS_RESOURCE); agent RSS {rss_before} KiB idle, {rss_held} KiB held: {per_conn:.1} KiB per connection (both agents of a connection together)",
        opts.conns,
        open_after.as_secs_f64(),
        opts.hold.as_secs_f64(),
        agents.len(),
        shards,
    );
    std::fs::create_dir_all(out_dir())?;
    std::fs::write(
        out_dir().join("scale.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    for a in &mut agents {
        a.stop();
    }
    drop(servers);
    ensure!(
        open as usize == per_shard * shards && alive == open && errors == 0,
        "scale: {open} opened, {alive} alive after the hold, {errors} errors (of {}): see target/bench/scale.json",
        per_shard * shards
    );
    Ok(result)
}
