//! The compiled policy and its decision functions.
//!
//! Rules are indexed by source so that a decision looks at the few rules that can apply to
//! the caller instead of scanning every rule: exact identities in a hash map, prefix
//! patterns in a hash map keyed by the prefix (a caller's ID has one candidate prefix per
//! path segment), plus the rules for unauthenticated callers and those with no identity
//! condition. Within the candidates, deny wins over allow; among rules of one action the
//! first in the file names the decision.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use super::policy::{
    Action, Cidr, ClientCertFile, DefaultAction, HttpFile, IdPattern, PathPattern, PolicyFile,
    PortRange,
};
use crate::{authn::Claims, identity::CertFacts, ratelimit::Limiter};

/// The connection being decided.
#[derive(Debug, Clone, Copy)]
pub struct Conn<'a> {
    /// The verified SPIFFE ID, or `None` for an unauthenticated (plaintext) caller.
    pub identity: Option<&'a str>,
    pub src: IpAddr,
    pub port: u16,
    /// The certificate an edge TLS client presented (verified against the listener's
    /// `client_ca`).
    pub client_cert: Option<&'a CertFacts>,
}

/// One HTTP request on a connection.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// Whether the request carries header `name` (lower case) with exactly `value`.
    pub has_header: &'a dyn Fn(&str, &str) -> bool,
    /// The claims of the request's verified bearer token.
    pub claims: Option<&'a Claims>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// HTTP rules apply to this connection: decide each request.
    InspectHttp,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The deciding rule's name, or `default deny|authenticated|all`.
    pub rule: String,
    /// The policy is in audit mode and this would have been denied.
    pub audit_denied: bool,
    /// The allowing rule's fault, to inject when it fires.
    pub fault: Option<Fault>,
    /// The allowing rule's rate limit.
    pub rate_limit: Option<RuleLimit>,
}

/// A rule's rate limit: the rule's own buckets, which every decision it makes shares.
#[derive(Debug, Clone)]
pub struct RuleLimit(pub Arc<Limiter>);

impl PartialEq for RuleLimit {
    /// The same buckets, not merely the same numbers.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A fault a rule injects into part of what it allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    pub delay: std::time::Duration,
    pub abort_status: Option<u16>,
    pub reset: bool,
    pub percent: f64,
}

impl Fault {
    /// Whether this request or connection gets the fault.
    pub fn fires(&self) -> bool {
        self.percent >= 100.0 || fastrand::f64() * 100.0 < self.percent
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.delay.is_zero() {
            parts.push(format!("delay {} ms", self.delay.as_millis()));
        }
        if let Some(s) = self.abort_status {
            parts.push(format!("abort {s}"));
        }
        if self.reset {
            parts.push("reset".to_string());
        }
        write!(f, "{} for {}%", parts.join(", "), self.percent)
    }
}

struct Http {
    methods: Vec<String>,
    paths: Vec<PathPattern>,
    headers: Vec<(String, String)>,
}

impl Http {
    fn matches(&self, r: &Request<'_>) -> bool {
        (self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case(r.method)))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(r.path)))
            && self.headers.iter().all(|(k, v)| (r.has_header)(k, v))
    }
}

struct Rule {
    name: String,
    action: Action,
    cidrs: Vec<Cidr>,
    ports: Vec<PortRange>,
    client_cert: Option<ClientCertFile>,
    claims: Vec<(String, Vec<String>)>,
    http: Option<Http>,
    fault: Option<Fault>,
    rate_limit: Option<RuleLimit>,
}

impl Rule {
    /// Whether the rule can only be decided per request.
    fn per_request(&self) -> bool {
        self.http.is_some() || !self.claims.is_empty()
    }

    fn matches_request(&self, r: &Request<'_>) -> bool {
        self.http.as_ref().is_none_or(|h| h.matches(r))
            && (self.claims.is_empty()
                || r.claims.is_some_and(|c| {
                    self.claims
                        .iter()
                        .all(|(name, values)| values.iter().any(|v| c.has(name, v)))
                }))
    }

    fn matches_l4(&self, c: &Conn<'_>) -> bool {
        (self.cidrs.is_empty() || self.cidrs.iter().any(|n| n.contains(c.src)))
            && (self.ports.is_empty() || self.ports.iter().any(|p| p.contains(c.port)))
            && self.client_cert.as_ref().is_none_or(|want| {
                c.client_cert.is_some_and(|cert| {
                    (want.sans.is_empty()
                        || cert
                            .sans()
                            .any(|san| want.sans.iter().any(|p| p.matches(san))))
                        && (want.subjects.is_empty()
                            || want.subjects.iter().any(|p| p.matches(&cert.subject)))
                })
            })
    }
}

struct EgressRule {
    name: String,
    action: Action,
    cidrs: Vec<Cidr>,
    ports: Vec<PortRange>,
    identities: Vec<IdPattern>,
}

impl EgressRule {
    fn matches(&self, dst: std::net::SocketAddr, identity: Option<&str>) -> bool {
        (self.cidrs.is_empty() || self.cidrs.iter().any(|n| n.contains(dst.ip())))
            && (self.ports.is_empty() || self.ports.iter().any(|p| p.contains(dst.port())))
            && (self.identities.is_empty()
                || identity.is_some_and(|id| {
                    self.identities.iter().any(|p| match p {
                        IdPattern::Exact(e) => e == id,
                        IdPattern::Prefix(pre) => id.starts_with(pre.as_str()),
                    })
                }))
    }
}

/// A compiled policy.
pub struct Policy {
    /// Where it came from (a file, or the built-in default).
    pub source: String,
    pub default: DefaultAction,
    pub audit: bool,
    rules: Vec<Rule>,
    by_exact: HashMap<String, Vec<u32>>,
    by_prefix: HashMap<String, Vec<u32>>,
    unauthenticated: Vec<u32>,
    any_source: Vec<u32>,
    egress_default: DefaultAction,
    egress: Vec<EgressRule>,
}

impl Policy {
    pub fn compile(source: impl Into<String>, file: PolicyFile) -> Policy {
        let mut p = Policy {
            source: source.into(),
            default: file.default,
            audit: file.audit,
            rules: Vec::with_capacity(file.rules.len()),
            by_exact: HashMap::new(),
            by_prefix: HashMap::new(),
            unauthenticated: Vec::new(),
            any_source: Vec::new(),
            egress_default: file
                .egress
                .as_ref()
                .map_or(DefaultAction::All, |e| e.default),
            egress: file
                .egress
                .map(|e| {
                    e.rules
                        .into_iter()
                        .map(|r| EgressRule {
                            name: r.name,
                            action: r.action,
                            cidrs: r.to.cidrs,
                            ports: r.to.ports,
                            identities: r.to.identities,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        for (i, r) in file.rules.into_iter().enumerate() {
            let i = i as u32;
            let rate_limit = r.rate_limit.as_ref().map(|l| {
                let spec = l
                    .spec(r.per_request())
                    .expect("checked when the policy was parsed");
                RuleLimit(Arc::new(Limiter::new(spec)))
            });
            if r.from.identities.is_empty() && !r.from.unauthenticated {
                p.any_source.push(i);
            }
            for id in &r.from.identities {
                match id {
                    IdPattern::Exact(s) => p.by_exact.entry(s.clone()).or_default().push(i),
                    IdPattern::Prefix(s) => p.by_prefix.entry(s.clone()).or_default().push(i),
                }
            }
            if r.from.unauthenticated {
                p.unauthenticated.push(i);
            }
            p.rules.push(Rule {
                name: r.name,
                action: r.action,
                cidrs: r.from.cidrs,
                ports: r.to.ports,
                client_cert: r.from.client_cert,
                claims: r.from.claims.into_iter().collect(),
                rate_limit,
                fault: r.fault.map(|f| Fault {
                    delay: std::time::Duration::from_millis(f.delay_ms),
                    abort_status: f.abort_status,
                    reset: f.reset,
                    percent: f.percent,
                }),
                http: r.http.map(|h: HttpFile| Http {
                    methods: h.methods,
                    paths: h.paths,
                    headers: h
                        .headers
                        .into_iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v))
                        .collect(),
                }),
            });
        }
        p
    }

    /// Denies everything: what a pod gets when no policy is configured for it.
    pub fn deny_all(source: &str) -> Policy {
        Self::compile(
            source,
            PolicyFile {
                default: DefaultAction::Deny,
                audit: false,
                rules: vec![],
                egress: None,
            },
        )
    }

    pub fn rule_names(&self) -> Vec<String> {
        self.rules.iter().map(|r| r.name.clone()).collect()
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Calls `f` with the index of every rule whose source condition admits `c`.
    fn for_candidates(&self, c: &Conn<'_>, mut f: impl FnMut(u32)) {
        self.any_source.iter().copied().for_each(&mut f);
        match c.identity {
            None => self.unauthenticated.iter().copied().for_each(&mut f),
            Some(id) => {
                if let Some(v) = self.by_exact.get(id) {
                    v.iter().copied().for_each(&mut f);
                }
                if !self.by_prefix.is_empty() {
                    // Every prefix of the ID that ends in '/', after the scheme.
                    let start = "spiffe://".len().min(id.len());
                    for (pos, _) in id[start..].match_indices('/') {
                        if let Some(v) = self.by_prefix.get(&id[..start + pos + 1]) {
                            v.iter().copied().for_each(&mut f);
                        }
                    }
                }
            }
        }
    }

    /// Decides a connection before any byte reaches the application.
    pub fn decide_l4(&self, c: &Conn<'_>, trust_domain: &str) -> Decision {
        let (mut deny, mut allow, mut http) = (u32::MAX, u32::MAX, false);
        self.for_candidates(c, |i| {
            let r = &self.rules[i as usize];
            if !r.matches_l4(c) {
                return;
            }
            match (r.action, r.per_request()) {
                (_, true) => http = true,
                (Action::Deny, false) => deny = deny.min(i),
                (Action::Allow, false) => allow = allow.min(i),
            }
        });
        if deny != u32::MAX {
            return self.finish(Verdict::Deny, self.rules[deny as usize].name.clone());
        }
        if http {
            return Decision {
                verdict: Verdict::InspectHttp,
                rule: String::new(),
                audit_denied: false,
                fault: None,
                rate_limit: None,
            };
        }
        if allow != u32::MAX {
            return self.allowed_by(allow);
        }
        self.default_decision(c, trust_domain)
    }

    /// Decides an outbound connection of the pod's applications, before any upstream
    /// connect. `identity` is the destination's expected identity when it is a known
    /// workload. Egress lists are short, so they are scanned in order.
    pub fn decide_egress(&self, dst: std::net::SocketAddr, identity: Option<&str>) -> Decision {
        let deny = self
            .egress
            .iter()
            .find(|r| r.action == Action::Deny && r.matches(dst, identity));
        let allow = || {
            self.egress
                .iter()
                .find(|r| r.action == Action::Allow && r.matches(dst, identity))
        };
        let (verdict, rule) = match (deny, allow()) {
            (Some(r), _) => (Verdict::Deny, r.name.clone()),
            (None, Some(r)) => (Verdict::Allow, r.name.clone()),
            (None, None) if self.egress_default == DefaultAction::Deny => {
                (Verdict::Deny, "egress default deny".to_string())
            }
            (None, None) => (Verdict::Allow, "egress default all".to_string()),
        };
        self.finish(verdict, rule)
    }

    /// Decides one HTTP request (after `decide_l4` said `InspectHttp`).
    pub fn decide_http(&self, c: &Conn<'_>, req: &Request<'_>, trust_domain: &str) -> Decision {
        let (mut deny, mut allow) = (u32::MAX, u32::MAX);
        self.for_candidates(c, |i| {
            let r = &self.rules[i as usize];
            if !r.matches_l4(c) || !r.matches_request(req) {
                return;
            }
            match r.action {
                Action::Deny => deny = deny.min(i),
                Action::Allow => allow = allow.min(i),
            }
        });
        if deny != u32::MAX {
            return self.finish(Verdict::Deny, self.rules[deny as usize].name.clone());
        }
        if allow != u32::MAX {
            return self.allowed_by(allow);
        }
        self.default_decision(c, trust_domain)
    }

    fn default_decision(&self, c: &Conn<'_>, trust_domain: &str) -> Decision {
        let (verdict, name) = match self.default {
            DefaultAction::Deny => (Verdict::Deny, "default deny"),
            DefaultAction::All => (Verdict::Allow, "default all"),
            DefaultAction::Authenticated => {
                let ours = c.identity.is_some_and(|id| {
                    id.strip_prefix("spiffe://")
                        .and_then(|r| r.split('/').next())
                        .is_some_and(|td| td == trust_domain)
                });
                (
                    if ours { Verdict::Allow } else { Verdict::Deny },
                    "default authenticated",
                )
            }
        };
        self.finish(verdict, name.to_string())
    }

    /// Applies audit mode: a deny is reported, not enforced.
    fn finish(&self, verdict: Verdict, rule: String) -> Decision {
        if verdict == Verdict::Deny && self.audit {
            return Decision {
                verdict: Verdict::Allow,
                rule,
                audit_denied: true,
                fault: None,
                rate_limit: None,
            };
        }
        Decision {
            verdict,
            rule,
            audit_denied: false,
            fault: None,
            rate_limit: None,
        }
    }

    /// Allowed by rule `i`, with its fault.
    fn allowed_by(&self, i: u32) -> Decision {
        let r = &self.rules[i as usize];
        Decision {
            fault: r.fault,
            rate_limit: r.rate_limit.clone(),
            ..self.finish(Verdict::Allow, r.name.clone())
        }
    }

    /// Every rule's rate limit, by rule name.
    pub fn rate_limits(&self) -> impl Iterator<Item = (&str, &Arc<Limiter>)> {
        self.rules
            .iter()
            .filter_map(|r| r.rate_limit.as_ref().map(|l| (r.name.as_str(), &l.0)))
    }

    /// Takes over what `previous`'s limits knew for rules of the same name and limit, so
    /// that a reload does not hand every caller a full bucket.
    pub fn adopt_rate_limits(&self, previous: &Policy) {
        for (name, limiter) in self.rate_limits() {
            if let Some((_, old)) = previous.rate_limits().find(|(n, _)| *n == name) {
                limiter.adopt(old);
            }
        }
    }
}
