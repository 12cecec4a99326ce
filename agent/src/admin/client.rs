//! The inspection CLI: `agent status | pods | conns | certs | policy show | explain |
//! log-level` talk to the admin socket; `agent maps` reads the pinned maps directly, so it
//! works while the daemon is down. Tables for people, `-o json` for scripts.
//!
//! Exit codes: 0 success, 1 not found, 3 the daemon is not running (no socket, or nobody
//! listening), 4 permission denied (the socket is root-only), 5 other errors.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub use crate::types::DEFAULT_ADMIN_SOCKET as DEFAULT_SOCKET;

#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct Target {
    /// The agent's admin socket.
    #[arg(long, global = true, env = "AGENT_ADMIN_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub struct Failure {
    pub code: u8,
    pub message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// One request to the admin API.
pub async fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, Value, String), Failure> {
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => fail(
                    3,
                    format!(
                        "the agent is not running (no one listens on {}); start it with `agent run`, or pass --socket",
                        socket.display()
                    ),
                ),
                std::io::ErrorKind::PermissionDenied => fail(
                    4,
                    format!("permission denied on {}: the admin API is root-only (use sudo)", socket.display()),
                ),
                _ => fail(5, format!("{}: {e}", socket.display())),
            })
        }
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(5, format!("admin API handshake: {e}")))?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "agent")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| fail(5, e.to_string()))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| fail(5, format!("admin API request: {e}")))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(5, e.to_string()))?
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status == 403 {
        return Err(fail(
            4,
            json["error"].as_str().unwrap_or("forbidden").to_string(),
        ));
    }
    Ok((status, json, text))
}

/// Renders rows of JSON objects as an aligned table of the given columns.
pub fn table(rows: &[Value], columns: &[(&str, &str)]) -> String {
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    let mut grid: Vec<Vec<String>> = vec![columns.iter().map(|(_, h)| h.to_string()).collect()];
    for r in rows {
        grid.push(columns.iter().map(|(k, _)| cell(&r[*k])).collect());
    }
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            grid.iter()
                .map(|row| row[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    grid.iter()
        .map(|row| {
            row.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A human account of one connection, from interception to decision, with the other leg
/// when the agent handled both ends.
pub fn explain(v: &Value) -> String {
    let mut out = vec![leg(&v["connection"])];
    if !v["other_leg"].is_null() {
        out.push(format!("other leg:\n{}", leg(&v["other_leg"])));
    }
    out.join("\n")
}

fn leg(c: &Value) -> String {
    let s = |k: &str| c[k].as_str().unwrap_or("-").to_string();
    let mut out = vec![format!(
        "connection {} of pod {} ({}, {})",
        c["id"],
        s("pod"),
        s("direction"),
        s("state")
    )];
    out.push(format!(
        "  1. intercepted by {}: client {} wanted {}",
        s("intercepted_by"),
        s("src"),
        s("dst")
    ));
    let tls = if s("tls") == "edge_tls" {
        format!(
            "edge TLS (ALPN {}), client certificate {}, handshake {} ms",
            if s("alpn").is_empty() {
                "none".into()
            } else {
                s("alpn")
            },
            if s("client_cert").is_empty() {
                "none".into()
            } else {
                s("client_cert")
            },
            c["handshake_ms"]
        )
    } else if s("tls") == "mtls" {
        format!(
            "mutual TLS; peer {} (certificate serial {}), handshake {} ms",
            s("peer_identity"),
            s("peer_serial"),
            c["handshake_ms"]
        )
    } else if s("detected") == "timeout" {
        "no byte arrived within the detection window (silence, not plaintext)".to_string()
    } else if s("peer_identity") == "unauthenticated" {
        "plaintext, unauthenticated".to_string()
    } else {
        "no TLS on this leg".to_string()
    };
    out.push(format!("  2. transport: {tls}"));
    let rule = s("policy_rule");
    out.push(format!(
        "  3. policy: {}",
        if rule.is_empty() || rule == "-" {
            "not evaluated".into()
        } else {
            format!("decided by `{rule}`")
        }
    ));
    if !s("fault").is_empty() && s("fault") != "-" {
        out.push(format!("     fault injected: {}", s("fault")));
    }
    out.push(format!("  4. second leg from {}", s("via")));
    let outcome = s("outcome");
    out.push(format!(
        "  5. outcome: {}{}; {} B sent, {} B received, {} ms",
        if outcome.is_empty() {
            "still open".into()
        } else {
            outcome
        },
        if s("reason").is_empty() {
            String::new()
        } else {
            format!(" ({})", s("reason"))
        },
        c["bytes_sent"],
        c["bytes_received"],
        c["duration_ms"]
    ));
    out.join("\n")
}
