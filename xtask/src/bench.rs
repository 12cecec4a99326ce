//! `cargo xtask bench [--quick]`: side-by-side arms on one simulated node, interleaved
//! (A B C A B C ...), medians and ratios to `direct` from the same run.
//!
//! Cores (2 on these machines): the load generator and the server run on CPU 0, the agent
//! (every proxy) on CPU 1, so the proxy's cost shows up as its own core's work rather than
//! as contention with the client.
//!
//! Arms in this version: `direct` (no agent), `ebpf` (connect-time redirect, plaintext
//! upstream), `mtls` (two agents' worth of proxying: mutual TLS between the pods). Still to
//! come (issue 6): `iptables`, `ebpf+skmsg`, `haproxy-mtls`, memory with 10,000 idle
//! connections, charts.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use simnode::{app::start_server, pki::DevCa, workspace_bin, Agent, AgentConfig, Node, Pod};

struct Plan {
    rounds: usize,
    secs: f64,
    bulk_bytes: u64,
    /// Idle proxied connections for the per-connection memory cost (last round only).
    idle_conns: usize,
}

const ARMS: [&str; 3] = ["direct", "ebpf", "mtls"];
const RR_PORT: u16 = 7000;
const SINK_PORT: u16 = 7001;

pub fn run(quick: bool) -> Result<()> {
    let plan = if quick {
        Plan {
            rounds: 1,
            secs: 0.4,
            bulk_bytes: 16 << 20,
            idle_conns: 100,
        }
    } else {
        Plan {
            rounds: 5,
            secs: 3.0,
            bulk_bytes: 1 << 30,
            // The issue asks for 10,000, but a proxied connection costs the agent two
            // descriptors and these machines cap RLIMIT_NOFILE at 20,000 (no
            // CAP_SYS_RESOURCE to raise it): 9,000 stays clear of that.
            idle_conns: 9_000,
        }
    };
    crate::demo::sweep_stale();
    let node = Node::new(&["client", "server"]);
    let (client, server) = (node.pod("client"), node.pod("server"));
    let mut cmd = server.command("taskset");
    cmd.args(["-c", "0"]).arg(workspace_bin("loadgen")).args([
        "serve",
        "--rr",
        &SocketAddr::new(server.ip(false), RR_PORT).to_string(),
        "--sink",
        &SocketAddr::new(server.ip(false), SINK_PORT).to_string(),
    ]);
    let _server = start_server(cmd);
    let ca = DevCa::named(&node.tmp().join("ca"), "bench.local");
    let ids = [
        ca.issue(
            "spiffe://bench.local/ns/b/sa/client",
            &node.tmp().join("c"),
            false,
        ),
        ca.issue(
            "spiffe://bench.local/ns/b/sa/server",
            &node.tmp().join("s"),
            false,
        ),
    ];

    let mut runs: Vec<Value> = Vec::new();
    for round in 0..plan.rounds {
        for arm in ARMS {
            let started = Instant::now();
            let mut agent = match arm {
                "direct" => None,
                "ebpf" => Some(start_agent(AgentConfig::new(&node).pod(client, "open"))),
                _ => Some(start_agent(
                    AgentConfig::new(&node)
                        .set("mesh_networks = [\"10.213.0.0/16\"]")
                        .pod_extra(client, "open", &ids[0].toml())
                        .pod_extra(server, "open", &ids[1].toml()),
                )),
            };
            let pid = agent.as_ref().and_then(Agent::pid);
            let rss_idle = pid.map(rss_kib);
            let mut result = workloads(client, server, &plan, pid);
            if let (Some(pid), Some(idle), true) = (pid, rss_idle, round + 1 == plan.rounds) {
                if let Ok(r) = result.as_mut() {
                    // The mtls arm's one agent serves both ends: four descriptors per
                    // connection instead of two.
                    let n = if arm == "mtls" {
                        plan.idle_conns / 2
                    } else {
                        plan.idle_conns
                    };
                    let (open, rss) = idle_rss(client, server, n, pid)?;
                    r["idle_conns_open"] = json!(open);
                    r["agent_rss_loaded_kib"] = json!(rss);
                    r["agent_kib_per_idle_conn"] =
                        json!((rss.saturating_sub(idle)) as f64 / open.max(1) as f64);
                }
            }
            if let Some(a) = agent.as_mut() {
                ensure!(
                    a.stop().success(),
                    "agent did not stop cleanly in arm {arm}"
                );
            }
            let mut r = result.with_context(|| format!("arm {arm}, round {round}"))?;
            r["arm"] = json!(arm);
            r["round"] = json!(round);
            r["agent_rss_idle_kib"] = json!(rss_idle);
            println!(
                "bench: round {round} arm {arm:<7} done in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            runs.push(r);
        }
    }
    let summary = summarize(&runs);
    let out = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench"));
    std::fs::create_dir_all(&out)?;
    let report = json!({"quick": quick, "rounds": plan.rounds, "runs": runs, "median": summary});
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = markdown(&summary, quick);
    std::fs::write(out.join("results.md"), &md)?;
    println!("\n{md}\nwritten to {}", out.display());
    // Every arm must have moved bytes: this is what the quick mode guards.
    for arm in ARMS {
        let s = &summary[arm];
        ensure!(
            s["bulk_gbit_s"].as_f64().unwrap_or(0.0) > 0.0,
            "arm {arm} moved no bulk bytes"
        );
        ensure!(
            s["closed_rps"].as_f64().unwrap_or(0.0) > 0.0,
            "arm {arm} served no requests"
        );
    }
    Ok(())
}

fn start_agent(cfg: AgentConfig) -> Agent {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"]).arg(workspace_bin("agent"));
    Agent::start_cmd(cmd, &cfg)
}

fn loadgen(client: &Pod, args: &[String]) -> Result<Value> {
    let mut cmd = client.command("taskset");
    cmd.args(["-c", "0"])
        .arg(workspace_bin("loadgen"))
        .args(args);
    let out = cmd.output().context("run loadgen")?;
    ensure!(
        out.status.success(),
        "loadgen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("loadgen printed no JSON")
}

fn workloads(client: &Pod, server: &Pod, plan: &Plan, agent: Option<u32>) -> Result<Value> {
    let rr = SocketAddr::new(server.ip(false), RR_PORT).to_string();
    let sink = SocketAddr::new(server.ip(false), SINK_PORT).to_string();
    let secs = plan.secs.to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let lat1k = loadgen(
        client,
        &s(&[
            "latency", "--to", &rr, "--rate", "1000", "--conns", "16", "--secs", &secs,
        ]),
    )?;
    let lat5k = loadgen(
        client,
        &s(&[
            "latency", "--to", &rr, "--rate", "5000", "--conns", "16", "--secs", &secs,
        ]),
    )?;
    let cpu_before = agent.map(cpu_seconds);
    let closed = loadgen(
        client,
        &s(&["closed", "--to", &rr, "--conns", "16", "--secs", &secs]),
    )?;
    let cpu = match (agent, cpu_before) {
        (Some(pid), Some(before)) => Some(cpu_seconds(pid) - before),
        _ => None,
    };
    let bulk = loadgen(
        client,
        &s(&[
            "bulk",
            "--to",
            &sink,
            "--bytes",
            &plan.bulk_bytes.to_string(),
        ]),
    )?;
    let conn = loadgen(
        client,
        &s(&["connrate", "--to", &rr, "--conns", "4", "--secs", &secs]),
    )?;
    let requests = closed["requests"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "latency_1k": lat1k, "latency_5k": lat5k, "closed": closed, "bulk": bulk, "connrate": conn,
        "agent_cpu_s_per_1k_requests": cpu.map(|c| if requests > 0.0 { c / requests * 1000.0 } else { 0.0 }),
    }))
}

/// Opens `n` proxied connections, holds them, and reads the agent's RSS meanwhile.
fn idle_rss(client: &Pod, server: &Pod, n: usize, pid: u32) -> Result<(usize, u64)> {
    use std::io::BufRead;
    let rr = SocketAddr::new(server.ip(false), RR_PORT).to_string();
    let mut cmd = client.command("taskset");
    cmd.args(["-c", "0"])
        .arg(workspace_bin("loadgen"))
        .args([
            "idle",
            "--to",
            &rr,
            "--conns",
            &n.to_string(),
            "--hold-ms",
            "1500",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("spawn loadgen idle")?;
    let stderr = child.stderr.take().context("loadgen stderr")?;
    let line = std::io::BufReader::new(stderr)
        .lines()
        .next()
        .transpose()?
        .unwrap_or_default();
    let open = serde_json::from_str::<Value>(&line)
        .ok()
        .and_then(|v| v["open"].as_u64())
        .unwrap_or(0) as usize;
    // Let the agent finish accepting before measuring.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let rss = rss_kib(pid);
    let _ = child.wait();
    Ok((open, rss))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of /proc/PID/stat, 12 and 13 here.
    // USER_HZ is 100 on every Linux ABI the agent runs on (it is not CONFIG_HZ).
    let hz = 100.0;
    (ticks(11) + ticks(12)) / hz
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn summarize(runs: &[Value]) -> Value {
    let metrics: [(&str, &[&str]); 11] = [
        ("p50_us_1k", &["latency_1k", "p50_us"]),
        ("p99_us_1k", &["latency_1k", "p99_us"]),
        ("p999_us_1k", &["latency_1k", "p999_us"]),
        ("p99_us_5k", &["latency_5k", "p99_us"]),
        ("p999_us_5k", &["latency_5k", "p999_us"]),
        ("closed_rps", &["closed", "rps"]),
        ("bulk_gbit_s", &["bulk", "gbit_s"]),
        ("conns_per_s", &["connrate", "per_s"]),
        (
            "agent_cpu_s_per_1k_requests",
            &["agent_cpu_s_per_1k_requests"],
        ),
        ("agent_rss_idle_kib", &["agent_rss_idle_kib"]),
        ("agent_kib_per_idle_conn", &["agent_kib_per_idle_conn"]),
    ];
    let mut out = serde_json::Map::new();
    for arm in ARMS {
        let mine: Vec<&Value> = runs.iter().filter(|r| r["arm"] == arm).collect();
        let mut m = serde_json::Map::new();
        for (name, path) in metrics {
            let vals = mine
                .iter()
                .filter_map(|r| path.iter().fold(*r, |v, k| &v[*k]).as_f64())
                .collect();
            m.insert(name.to_string(), json!(median(vals)));
        }
        out.insert(arm.to_string(), Value::Object(m));
    }
    let direct = out["direct"].clone();
    for arm in ARMS {
        let a = out[arm].clone();
        let ratio = |k: &str| {
            let d = direct[k].as_f64().unwrap_or(0.0);
            if d > 0.0 {
                a[k].as_f64().unwrap_or(0.0) / d
            } else {
                0.0
            }
        };
        let added = |k: &str| a[k].as_f64().unwrap_or(0.0) - direct[k].as_f64().unwrap_or(0.0);
        let o = out[arm].as_object_mut().expect("object");
        o.insert("added_p99_us_1k".into(), json!(added("p99_us_1k")));
        o.insert("closed_rps_ratio".into(), json!(ratio("closed_rps")));
        o.insert("bulk_ratio".into(), json!(ratio("bulk_gbit_s")));
        o.insert("conns_per_s_ratio".into(), json!(ratio("conns_per_s")));
    }
    Value::Object(out)
}

fn markdown(s: &Value, quick: bool) -> String {
    let mut t = String::from(if quick {
        "Quick run (harness check only: too short to compare)\n\n"
    } else {
        ""
    });
    t.push_str("| arm | p50 µs @1k | p99 µs @1k | +p99 µs vs direct | p99.9 µs @1k | p99 µs @5k | closed-loop req/s (ratio) | bulk Gbit/s (ratio) | new conns/s (ratio) | agent CPU s / 1k req | agent RSS idle KiB | agent KiB / idle conn |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for arm in ARMS {
        let a = &s[arm];
        let f = |k: &str| a[k].as_f64().unwrap_or(0.0);
        t.push_str(&format!(
            "| {arm} | {:.0} | {:.0} | {:+.0} | {:.0} | {:.0} | {:.0} ({:.2}x) | {:.2} ({:.2}x) | {:.0} ({:.2}x) | {:.4} | {:.0} | {:.1} |\n",
            f("p50_us_1k"), f("p99_us_1k"), f("added_p99_us_1k"), f("p999_us_1k"), f("p99_us_5k"),
            f("closed_rps"), f("closed_rps_ratio"), f("bulk_gbit_s"), f("bulk_ratio"),
            f("conns_per_s"), f("conns_per_s_ratio"), f("agent_cpu_s_per_1k_requests"), f("agent_rss_idle_kib"), f("agent_kib_per_idle_conn"),
        ));
    }
    t
}
