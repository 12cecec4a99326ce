//! `agent policy check | eval`: offline validation and decisions, for operators and CI.

use std::{net::IpAddr, path::PathBuf, str::FromStr};

use super::{Conn, Policy, PolicyFile, Request, Verdict};

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCmd {
    /// Validate a policy file; exit 0 if it is good, 1 with file:line:column and reason.
    Check { file: PathBuf },
    /// Decide one connection (and request) offline; exit 0 if allowed, 1 if denied.
    Eval {
        #[arg(long)]
        policy: PathBuf,
        /// A SPIFFE ID, `unauthenticated`, or a source address/CIDR (unauthenticated).
        #[arg(long)]
        from: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        method: Option<String>,
        #[arg(long)]
        path: Option<String>,
        /// The pod's trust domain (for `default: authenticated`); by default the caller's.
        #[arg(long)]
        trust_domain: Option<String>,
        /// An edge TLS client presenting a certificate with this SAN (repeat for several);
        /// its requests are decided one by one, as the agent serves edge clients.
        #[arg(long = "client-san")]
        client_sans: Vec<String>,
        /// ...and this subject (as the access log's `client_cert` prints it).
        #[arg(long)]
        client_subject: Option<String>,
        /// A claim of the request's verified bearer token, `name=value` (repeat a name for
        /// an array claim such as `groups`).
        #[arg(long = "claim")]
        claims: Vec<String>,
    },
}

/// Runs the command; returns the text to print and the exit code.
pub fn run(cmd: PolicyCmd) -> (String, u8) {
    match cmd {
        PolicyCmd::Check { file } => match PolicyFile::load(&file) {
            Ok(p) => {
                let c = Policy::compile(file.display().to_string(), p);
                (
                    format!(
                        "{}: ok, {} rules, default {:?}{}",
                        file.display(),
                        c.rule_count(),
                        c.default,
                        if c.audit { ", audit mode" } else { "" }
                    ),
                    0,
                )
            }
            Err(e) => (e.to_string(), 1),
        },
        PolicyCmd::Eval {
            policy,
            from,
            port,
            method,
            path,
            trust_domain,
            client_sans,
            client_subject,
            claims,
        } => {
            let mut token = crate::authn::Claims::default();
            for c in &claims {
                let Some((name, value)) = c.split_once('=') else {
                    return (format!("--claim {c}: give name=value"), 2);
                };
                let entry = token
                    .all
                    .entry(name.to_string())
                    .or_insert_with(|| serde_json::Value::Array(Vec::new()));
                if let serde_json::Value::Array(items) = entry {
                    items.push(value.into());
                }
            }
            let token = (!claims.is_empty()).then_some(token);
            let file = match PolicyFile::load(&policy) {
                Ok(f) => f,
                Err(e) => return (e.to_string(), 2),
            };
            let p = Policy::compile(policy.display().to_string(), file);
            let (identity, src) = if from.starts_with("spiffe://") {
                (Some(from.as_str()), IpAddr::from([0, 0, 0, 0]))
            } else if from == "unauthenticated" {
                (None, IpAddr::from([0, 0, 0, 0]))
            } else {
                match crate::types::parse_cidr(&from)
                    .or_else(|e| IpAddr::from_str(&from).map(Into::into).map_err(|_| e))
                {
                    Ok(net) => (None, net.network()),
                    Err(e) => return (format!("--from: {e}"), 2),
                }
            };
            let td = trust_domain.unwrap_or_else(|| {
                identity
                    .and_then(|i| i.strip_prefix("spiffe://"))
                    .and_then(|r| r.split('/').next())
                    .unwrap_or("")
                    .to_string()
            });
            let edge = (!client_sans.is_empty() || client_subject.is_some()).then(|| {
                crate::identity::CertFacts {
                    // Every SAN kind is matched alike; DNS is where they are kept here.
                    dns: client_sans,
                    subject: client_subject.unwrap_or_default(),
                    ..Default::default()
                }
            });
            if edge.is_some() && identity.is_some() {
                return (
                    "--client-san/--client-subject describe an edge client, which has no SPIFFE ID: give --from unauthenticated or an address".into(),
                    2,
                );
            }
            let conn = Conn {
                identity,
                src,
                port,
                client_cert: edge.as_ref(),
            };
            let mut d = p.decide_l4(&conn, &td);
            let mut level = "connection";
            let per_request =
                d.verdict == Verdict::InspectHttp || (edge.is_some() && d.verdict != Verdict::Deny);
            if per_request {
                let (Some(m), Some(path)) = (method.as_deref(), path.as_deref()) else {
                    return (
                        "this connection is decided per HTTP request: give --method and --path"
                            .into(),
                        2,
                    );
                };
                let none = |_: &str, _: &str| false;
                d = p.decide_http(
                    &conn,
                    &Request {
                        method: m,
                        path,
                        has_header: &none,
                        claims: token.as_ref(),
                    },
                    &td,
                );
                level = "request";
            }
            let allowed = d.verdict == Verdict::Allow;
            let mut audit = if d.audit_denied {
                " (audit mode: would be DENIED)".to_string()
            } else if let Some(f) = d.fault {
                format!(" with a fault injected: {f}")
            } else {
                String::new()
            };
            if let Some(l) = &d.rate_limit {
                audit.push_str(&format!(", rate limited to {}", l.0.spec()));
            }
            (
                format!(
                    "{} {level} by `{}`{audit} (policy {})",
                    if allowed { "ALLOW" } else { "DENY" },
                    d.rule,
                    p.source
                ),
                if allowed { 0 } else { 1 },
            )
        }
    }
}
