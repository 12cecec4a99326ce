//! The inspection subcommands of the binary: fetch from the admin API, print a table or
//! JSON, exit with a code scripts can rely on (see `agent::admin::client`).

use std::{path::Path, process::ExitCode};

use agent::admin::client::{self, Output, Target};
use serde_json::Value;

pub enum View {
    Status,
    Pods,
    Conns(Option<String>),
    Certs,
    Policy,
    Explain(String),
    LogLevel(String),
    LogFormat(String),
    Metrics,
    /// `agent enroll`: the request, as JSON.
    Enroll(String),
    Release(String),
}

pub fn run(target: &Target, view: View) -> ExitCode {
    let (method, path, body) = match &view {
        View::Status => ("GET", "/status".to_string(), String::new()),
        View::Pods => ("GET", "/pods".into(), String::new()),
        View::Conns(None) => ("GET", "/conns".into(), String::new()),
        View::Conns(Some(p)) => ("GET", format!("/conns?pod={p}"), String::new()),
        View::Certs => ("GET", "/certs".into(), String::new()),
        View::Policy => ("GET", "/policy".into(), String::new()),
        View::Explain(k) => (
            "GET",
            format!("/explain?key={}", k.replace(':', "%3A")),
            String::new(),
        ),
        View::LogLevel(f) => ("PUT", "/loglevel".into(), f.clone()),
        View::LogFormat(f) => ("PUT", "/logformat".into(), f.clone()),
        View::Metrics => ("GET", "/metrics".into(), String::new()),
        View::Enroll(body) => ("POST", "/pods".into(), body.clone()),
        View::Release(name) => ("DELETE", format!("/pods/{name}"), String::new()),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return done(Err(client::Failure {
                code: 5,
                message: e.to_string(),
            }))
        }
    };
    let result = rt.block_on(client::call(&target.socket, method, &path, &body));
    let (status, json, raw) = match result {
        Ok(r) => r,
        Err(f) => return done(Err(f)),
    };
    if status == 404 {
        return done(Err(client::Failure {
            code: 1,
            message: json["error"].as_str().unwrap_or("not found").to_string(),
        }));
    }
    if status >= 400 {
        // A request the agent refused as given (a bad field, a different spec for an
        // enrolled pod) is the caller's to fix, like a bad config file.
        let refused_request = matches!(view, View::Enroll(_) | View::Release(_));
        let code = if refused_request && matches!(status, 400 | 409) {
            2
        } else {
            5
        };
        return done(Err(client::Failure {
            code,
            message: json["error"]
                .as_str()
                .unwrap_or("the agent refused the request")
                .to_string(),
        }));
    }
    if matches!(view, View::Metrics) {
        return done(Ok(raw.trim_end().to_string()));
    }
    let text = match target.output {
        Output::Json => serde_json::to_string_pretty(&json).unwrap_or_default(),
        Output::Table => render(&view, &json),
    };
    done(Ok(text))
}

fn render(view: &View, v: &Value) -> String {
    let rows = v.as_array().cloned().unwrap_or_default();
    match view {
        View::Status => {
            let pods = client::table(
                v["pods"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                &[
                    ("name", "POD"),
                    ("state", "STATE"),
                    ("programs", "PROGRAMS"),
                ],
            );
            let features = v["kernel"]["features"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let present = features.iter().filter(|f| f["available"] == true).count();
            let splice = match v["kernel"]["splice"].as_str() {
                Some(s) if s.starts_with("unavailable") => format!("; splice {s}"),
                _ => String::new(),
            };
            format!(
                "agent {}  up {}s  ready {}  kernel {} ({present} of {} features probed present{splice})  active connections {}\n\n{pods}",
                v["version"].as_str().unwrap_or("?"),
                v["uptime_seconds"],
                v["ready"],
                v["kernel"]["release"].as_str().unwrap_or("?"),
                features.len(),
                v["connections_active"]
            )
        }
        View::Pods => client::table(
            &rows,
            &[
                ("name", "POD"),
                ("state", "STATE"),
                ("addresses", "ADDRESSES"),
                ("mode", "MODE"),
                ("fail_mode", "FAIL"),
                ("identity", "IDENTITY"),
                ("policy", "POLICY"),
                ("note", "NOTE"),
            ],
        ),
        View::Conns(_) => client::table(
            &rows,
            &[
                ("id", "ID"),
                ("pod", "POD"),
                ("direction", "DIR"),
                ("src", "SRC"),
                ("dst", "DST"),
                ("tls", "TLS"),
                ("peer_identity", "PEER"),
                ("policy_rule", "RULE"),
                ("duration_ms", "MS"),
            ],
        ),
        View::Certs => client::table(
            &rows,
            &[
                ("pod", "POD"),
                ("spiffe_id", "SPIFFE ID"),
                ("issuer", "ISSUER"),
                ("serial", "SERIAL"),
                ("expires_in_seconds", "EXPIRES IN (s)"),
            ],
        ),
        View::Policy => client::table(
            &rows,
            &[
                ("pod", "POD"),
                ("source", "SOURCE"),
                ("default", "DEFAULT"),
                ("audit", "AUDIT"),
                ("rules", "RULES"),
            ],
        ),
        View::Explain(_) => client::explain(v),
        View::LogLevel(_) => format!(
            "log level set to {}",
            v["log_level"].as_str().unwrap_or("?")
        ),
        View::LogFormat(_) => format!(
            "log format set to {}",
            v["log_format"].as_str().unwrap_or("?")
        ),
        View::Metrics => String::new(),
        View::Enroll(_) => match v["result"].as_str() {
            Some("unchanged") => format!(
                "pod {} is already enrolled with this spec (id {}): nothing changed",
                v["pod"].as_str().unwrap_or("?"),
                v["pod_id"]
            ),
            _ => format!(
                "pod {} enrolled (id {}){}",
                v["pod"].as_str().unwrap_or("?"),
                v["pod_id"],
                if v["adopted"] == true {
                    ", adopting the programs it had pinned"
                } else {
                    ""
                }
            ),
        },
        View::Release(_) => format!(
            "pod {} released ({}): {} connections drained, {} cut at the deadline",
            v["pod"].as_str().unwrap_or("?"),
            if v["fail_mode"] == "closed" {
                "fail-closed: its connections are refused until it is enrolled again"
            } else {
                "fail-open: its traffic now goes direct"
            },
            v["drained"],
            v["cut_at_deadline"]
        ),
    }
}

/// `agent maps`: straight from the pins, no daemon needed.
pub fn maps(pin_root: &Path, output: Output) -> ExitCode {
    match agent::ebpf::dump::dump(pin_root) {
        Err(e) => done(Err(client::Failure {
            code: 3,
            message: format!("no pinned maps under {}: {e} (is an agent, or a fail-closed pod it left, on this node?)", pin_root.display()),
        })),
        Ok(v) => done(Ok(match output {
            Output::Json => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Output::Table => {
                let section = |title: &str, rows: &Value, cols: &[(&str, &str)]| {
                    format!("{title}\n{}\n", client::table(rows.as_array().map(Vec::as_slice).unwrap_or(&[]), cols))
                };
                let counters: Vec<Value> = v["COUNTERS"]
                    .as_object()
                    .map(|m| m.iter().map(|(k, n)| serde_json::json!({"event": k, "count": n})).collect())
                    .unwrap_or_default();
                [
                    section("POD_CONFIG", &v["POD_CONFIG"], &[("pod_id", "POD ID"), ("netns_cookie", "NETNS COOKIE"), ("outbound_port", "OUT PORT"), ("fail_open", "FAIL OPEN"), ("blocked", "BLOCKED")]),
                    section("POD_ADDRS", &v["POD_ADDRS"], &[("address", "ADDRESS"), ("pod_id", "POD ID")]),
                    section("ORIG_DST (pending)", &v["ORIG_DST"], &[("pod_id", "POD ID"), ("client", "CLIENT"), ("original_destination", "ORIGINAL DESTINATION")]),
                    section("COUNTERS", &Value::Array(counters), &[("event", "EVENT"), ("count", "COUNT")]),
                ]
                .join("\n")
            }
        })),
    }
}

fn done(r: Result<String, client::Failure>) -> ExitCode {
    match r {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("agent: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
