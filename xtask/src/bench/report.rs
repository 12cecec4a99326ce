//! Medians, ratios to `direct`, the acceleration decision and the targets of issue 6.

use serde_json::{json, Map, Value};

/// (name in the summary, path in one run's JSON).
const METRICS: [(&str, &[&str]); 21] = [
    (
        "bulk_client_proxy_cpu_util",
        &["bulk", "client_proxy_cpu_util"],
    ),
    (
        "connrate_client_proxy_cpu_util",
        &["connrate", "client_proxy_cpu_util"],
    ),
    ("bulk_proxy_cpu_util", &["bulk", "proxy_cpu_util"]),
    ("connrate_proxy_cpu_util", &["connrate", "proxy_cpu_util"]),
    ("p50_us_1k", &["latency_1k", "p50_us"]),
    ("p90_us_1k", &["latency_1k", "p90_us"]),
    ("p99_us_1k", &["latency_1k", "p99_us"]),
    ("p999_us_1k", &["latency_1k", "p999_us"]),
    ("p99_us_5k", &["latency_5k", "p99_us"]),
    ("p999_us_5k", &["latency_5k", "p999_us"]),
    ("closed_rps", &["closed", "rps"]),
    ("closed64_rps", &["closed_64", "rps"]),
    ("closed16k_rps", &["closed_16k", "rps"]),
    ("p999_us_1k_64", &["latency_1k_64", "p999_us"]),
    ("p999_us_1k_16k", &["latency_1k_16k", "p999_us"]),
    ("bulk_gbit_s", &["bulk", "gbit_s"]),
    ("conns_per_s", &["connrate", "per_s"]),
    (
        "agent_cpu_s_per_1k_requests",
        &["agent_cpu_s_per_1k_requests"],
    ),
    ("agent_rss_idle_kib", &["agent_rss_idle_kib"]),
    ("agent_rss_loaded_kib", &["agent_rss_loaded_kib"]),
    ("agent_kib_per_idle_conn", &["agent_kib_per_idle_conn"]),
];

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

pub fn summarize(runs: &[Value], arms: &[&str]) -> Value {
    let mut out = Map::new();
    for &arm in arms {
        let mine: Vec<&Value> = runs.iter().filter(|r| r["arm"] == arm).collect();
        let mut m = Map::new();
        for (name, path) in METRICS {
            let vals = mine
                .iter()
                .filter_map(|r| path.iter().fold(*r, |v, k| &v[*k]).as_f64())
                .collect();
            m.insert(name.to_string(), json!(median(vals)));
        }
        // The percentile curve at 1,000 req/s: the median across rounds at each quantile.
        let curves: Vec<&Vec<Value>> = mine
            .iter()
            .filter_map(|r| r["latency_1k"]["curve"].as_array())
            .collect();
        let points = curves.first().map_or(0, |c| c.len());
        let curve: Vec<Value> = (0..points)
            .map(|i| {
                let q = curves[0][i][0].as_f64().unwrap_or(0.0);
                let us = median(
                    curves
                        .iter()
                        .filter_map(|c| c.get(i)?[1].as_f64())
                        .collect(),
                );
                json!([q, us])
            })
            .collect();
        m.insert("curve_1k".into(), json!(curve));
        out.insert(arm.to_string(), Value::Object(m));
    }
    let direct = out.get("direct").cloned().unwrap_or(Value::Null);
    for &arm in arms {
        let a = out[arm].clone();
        let ratio = |k: &str| {
            let d = f(&direct, k);
            if d > 0.0 {
                f(&a, k) / d
            } else {
                0.0
            }
        };
        let o = out[arm].as_object_mut().expect("object");
        o.insert(
            "added_p99_us_1k".into(),
            json!(f(&a, "p99_us_1k") - f(&direct, "p99_us_1k")),
        );
        for k in ["closed_rps", "bulk_gbit_s", "conns_per_s"] {
            o.insert(format!("{k}_ratio"), json!(ratio(k)));
        }
    }
    Value::Object(out)
}

pub fn markdown(s: &Value, arms: &[&str], quick: bool) -> String {
    let mut t = String::from(if quick {
        "Quick run (harness check only: too short to compare)\n\n"
    } else {
        ""
    });
    t.push_str("| arm | p50 µs @1k | p99 µs @1k | +p99 µs vs direct | p99.9 µs @1k | p99 µs @5k | closed-loop req/s (ratio) | bulk Gbit/s (ratio) | new conns/s (ratio) | proxy CPU s / 1k req | proxy RSS idle KiB | proxy KiB / idle conn |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for &arm in arms {
        let a = &s[arm];
        let g = |k: &str| f(a, k);
        t.push_str(&format!(
            "| {arm} | {:.0} | {:.0} | {:+.0} | {:.0} | {:.0} | {:.0} ({:.2}x) | {:.2} ({:.2}x) | {:.0} ({:.2}x) | {:.4} | {:.0} | {:.1} |\n",
            g("p50_us_1k"), g("p99_us_1k"), g("added_p99_us_1k"), g("p999_us_1k"), g("p99_us_5k"),
            g("closed_rps"), g("closed_rps_ratio"), g("bulk_gbit_s"), g("bulk_gbit_s_ratio"),
            g("conns_per_s"), g("conns_per_s_ratio"), g("agent_cpu_s_per_1k_requests"),
            g("agent_rss_idle_kib"), g("agent_kib_per_idle_conn"),
        ));
    }
    t.push_str("\nBy message size (closed loop over 16 connections; p99.9 open loop at 1,000 req/s):\n\n| arm | req/s 64 B | req/s 16 KiB | p99.9 µs 64 B | p99.9 µs 16 KiB |\n|---|---|---|---|---|\n");
    for &arm in arms {
        let a = &s[arm];
        t.push_str(&format!(
            "| {arm} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            f(a, "closed64_rps"),
            f(a, "closed16k_rps"),
            f(a, "p999_us_1k_64"),
            f(a, "p999_us_1k_16k")
        ));
    }
    if let Some(d) = acceleration(s) {
        t.push_str(&format!("\n{d}\n"));
    }
    let targets = targets(s);
    if !targets.is_empty() {
        t.push_str("\nTargets of issue 6:\n\n");
        for line in targets {
            t.push_str(&format!("- {line}\n"));
        }
    }
    t
}

/// A win must be at least this much more: single rounds here spread by +-10% or more, and a
/// 0.3% "win" is a tie.
const WIN_MARGIN: f64 = 1.03;

/// Arm 4 against arm 3: on by default only if it wins at both 64 B and 16 KiB without a
/// worse p99.9.
fn acceleration(s: &Value) -> Option<String> {
    let (on, off) = (s.get("ebpf+skmsg")?, s.get("ebpf")?);
    let wins = |k: &str| f(on, k) >= f(off, k) * WIN_MARGIN;
    let tail_ok = |k: &str| f(on, k) <= f(off, k);
    let verdict = wins("closed64_rps")
        && wins("closed16k_rps")
        && tail_ok("p999_us_1k_64")
        && tail_ok("p999_us_1k_16k");
    Some(format!(
        "Acceleration (ebpf+skmsg vs ebpf): req/s at 64 B {:.2}x, at 16 KiB {:.2}x; p99.9 at 64 B {:.0} vs {:.0} µs, at 16 KiB {:.0} vs {:.0} µs. Verdict: **{}**.",
        f(on, "closed64_rps") / f(off, "closed64_rps").max(1e-9),
        f(on, "closed16k_rps") / f(off, "closed16k_rps").max(1e-9),
        f(on, "p999_us_1k_64"),
        f(off, "p999_us_1k_64"),
        f(on, "p999_us_1k_16k"),
        f(off, "p999_us_1k_16k"),
        if verdict {
            "wins (by at least 3% at both sizes, p99.9 no worse): on by default"
        } else {
            "does not win on every count: off by default"
        }
    ))
}

fn targets(s: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mark = |ok: bool| if ok { "met" } else { "**missed**" };
    let (mtls, ha, ebpf, ipt) = (
        s.get("mtls"),
        s.get("haproxy-mtls"),
        s.get("ebpf"),
        s.get("iptables"),
    );
    if let Some(m) = mtls {
        let added = f(m, "added_p99_us_1k");
        out.push(format!(
            "{}: mtls adds {added:.0} µs to p99 at 1,000 req/s (target under 150 µs)",
            mark(added < 150.0)
        ));
        if let Some(h) = ha {
            let ha_added = f(h, "added_p99_us_1k");
            out.push(format!(
                "{}: mtls adds {added:.0} µs, haproxy-mtls {ha_added:.0} µs (target at most half)",
                mark(added <= ha_added / 2.0)
            ));
            let r = f(m, "bulk_gbit_s") / f(h, "bulk_gbit_s").max(1e-9);
            out.push(format!(
                "{}: mtls bulk {r:.2}x haproxy-mtls (target at least 1.5x)",
                mark(r >= 1.5)
            ));
        }
        let c = f(m, "conns_per_s");
        let util = f(m, "connrate_client_proxy_cpu_util");
        let per_core = c / util.max(1e-9);
        out.push(format!(
            "{}: {c:.0} new mTLS connections/s with the client-side agent {:.0}% busy on its core, i.e. {per_core:.0} per agent CPU-second (target at least 3,000 with the agent on one core)",
            mark(per_core >= 3000.0),
            util * 100.0
        ));
        let leg = f(m, "agent_kib_per_idle_conn") / 2.0;
        out.push(format!(
            "{}: {leg:.1} KiB per idle mTLS connection per agent ({:.1} KiB for the two agents together; target under 24)",
            mark(leg < 24.0),
            f(m, "agent_kib_per_idle_conn")
        ));
        let r = f(m, "bulk_gbit_s_ratio");
        out.push(format!(
            "{}: mtls bulk {r:.2}x direct (target at least 0.48x)",
            mark(r >= 0.48)
        ));
    }
    if let Some(e) = ebpf {
        let r = f(e, "bulk_gbit_s_ratio");
        out.push(format!(
            "{}: ebpf bulk {r:.2}x direct (target at least 0.6x)",
            mark(r >= 0.6)
        ));
        let rss = f(e, "agent_rss_idle_kib") / 1024.0;
        out.push(format!(
            "{}: agent idle RSS {rss:.1} MiB (target under 15)",
            mark(rss < 15.0)
        ));
        if let Some(i) = ipt {
            let r = f(e, "conns_per_s") / f(i, "conns_per_s").max(1e-9);
            out.push(format!(
                "{}: ebpf sets up connections {r:.2}x as fast as iptables (target at least 1.3x)",
                mark(r >= 1.3)
            ));
        }
    }
    out
}
