//! Authorization: every inbound connection to an enrolled port is decided by the pod's
//! policy before a byte reaches the application. Default deny, deny wins over allow,
//! audit mode, and hot reload that keeps the last good policy when a new file is bad.

pub mod cli;
mod engine;
mod policy;

pub use engine::{Conn, Decision, Fault, Policy, Request, RuleLimit, Verdict};
pub use policy::{DefaultAction, PolicyError, PolicyFile};

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::{
    identity::{CertFacts, SpiffeId},
    store::{Source, Store},
    types::{ClientAddr, OrigDstAddr, PodName},
};

pub const BUILTIN: &str = "built-in (no policy configured: default deny)";

/// Where a pod's policy comes from: a file, or nothing (the built-in deny-all).
#[derive(Debug)]
pub struct PolicySource(pub Option<PathBuf>);

impl Source for PolicySource {
    type Value = Policy;
    type Error = PolicyError;
    const KIND: &'static str = "policy";
    const REJECTED: &'static str = "policy reload rejected; the last good policy keeps deciding";

    fn load(&self) -> Result<Policy, PolicyError> {
        Ok(match &self.0 {
            Some(p) => Policy::compile(p.display().to_string(), PolicyFile::load(p)?),
            None => Policy::deny_all(BUILTIN),
        })
    }

    fn files(&self) -> Vec<&Path> {
        self.0.iter().map(PathBuf::as_path).collect()
    }

    fn loaded(&self, pod: &PodName, policy: &Policy, previous: Option<&Policy>) {
        if self.0.is_none() {
            warn!(pod = %pod, "no policy configured: every inbound connection is denied (default deny)");
        }
        if let Some(previous) = previous {
            policy.adopt_rate_limits(previous);
        }
        let what = if previous.is_some() {
            "policy reloaded"
        } else {
            "policy loaded"
        };
        info!(pod = %pod, source = %policy.source, rules = policy.rule_count(),
              default = ?policy.default, audit = policy.audit, "{what}");
    }
}

/// The policy a pod is decided by now; swapped atomically on reload.
pub type PolicyStore = Store<PolicySource>;

/// An allowed connection or request, naming the rule that allowed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Permit {
    pub rule: String,
    /// Audit mode: a rule denied this, and it was let through to be reported.
    pub audit_denied: bool,
    /// The allowing rule's fault injection, if it has one.
    pub fault: Option<Fault>,
    /// The allowing rule's rate limit, if it has one.
    pub rate_limit: Option<RuleLimit>,
}

/// A refused connection or request, naming the rule and the policy that refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub rule: String,
    /// The policy's source (its file).
    pub policy: String,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "denied by `{}` ({})", self.rule, self.policy)
    }
}

/// How an allowed inbound connection proceeds.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// Decided for the whole connection.
    Connection(Permit),
    /// HTTP rules apply: every request is decided on its own.
    PerRequest,
}

/// Who is calling: the identity the handshake verified (none for plaintext) and the
/// client's address.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub peer: Option<&'a SpiffeId>,
    pub client: ClientAddr,
    /// The certificate an edge TLS client presented, verified against its listener's CA.
    pub client_cert: Option<&'a CertFacts>,
}

impl Caller<'_> {
    fn conn(&self, dst: OrigDstAddr) -> Conn<'_> {
        Conn {
            identity: self.peer.map(SpiffeId::as_str),
            src: self.client.ip(),
            port: dst.port(),
            client_cert: self.client_cert,
        }
    }
}

fn typed(policy: &Policy, d: Decision) -> Result<Permit, Denial> {
    match d.verdict {
        Verdict::Deny => Err(Denial {
            rule: d.rule,
            policy: policy.source.clone(),
        }),
        Verdict::Allow | Verdict::InspectHttp => Ok(Permit {
            rule: d.rule,
            audit_denied: d.audit_denied,
            fault: d.fault,
            rate_limit: d.rate_limit,
        }),
    }
}

impl Policy {
    /// Decides an inbound connection before any byte reaches the application.
    pub fn authorize(
        &self,
        caller: Caller<'_>,
        dst: OrigDstAddr,
        trust_domain: &str,
    ) -> Result<Inbound, Denial> {
        let d = self.decide_l4(&caller.conn(dst), trust_domain);
        if d.verdict == Verdict::InspectHttp {
            return Ok(Inbound::PerRequest);
        }
        typed(self, d).map(Inbound::Connection)
    }

    /// Decides one HTTP request of a connection that [`Policy::authorize`] said is decided
    /// per request.
    pub fn authorize_request(
        &self,
        caller: Caller<'_>,
        dst: OrigDstAddr,
        req: &Request<'_>,
        trust_domain: &str,
    ) -> Result<Permit, Denial> {
        let d = self.decide_http(&caller.conn(dst), req, trust_domain);
        typed(self, d)
    }

    /// Decides an outbound connection of the pod's applications, before any upstream
    /// connect; `expected` is the destination's identity when it is a known workload.
    pub fn authorize_egress(
        &self,
        dst: OrigDstAddr,
        expected: Option<&SpiffeId>,
    ) -> Result<Permit, Denial> {
        let d = self.decide_egress(dst.addr(), expected.map(SpiffeId::as_str));
        typed(self, d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    const TD: &str = "td";

    fn policy(yaml: &str) -> Policy {
        Policy::compile("test", PolicyFile::parse("test.yaml", yaml).unwrap())
    }

    fn l4(p: &Policy, id: Option<&str>, src: &str, port: u16) -> (Verdict, String) {
        let src: IpAddr = src.parse().unwrap();
        let d = p.decide_l4(
            &Conn {
                identity: id,
                src,
                port,
                client_cert: None,
            },
            TD,
        );
        (d.verdict, d.rule)
    }

    const RULES: &str = r#"
rules:
  - name: payments-prefix
    action: allow
    from: { identities: ["spiffe://td/ns/payments/*"] }
    to: { ports: [8080, "9000-9010"] }
  - name: exact-web
    action: allow
    from: { identities: ["spiffe://td/ns/web/sa/frontend"] }
    to: { ports: [8080] }
  - name: block-legacy
    action: deny
    from: { identities: ["spiffe://td/ns/payments/sa/legacy"] }
  - name: plaintext-health
    action: allow
    from: { unauthenticated: true, cidrs: ["10.9.0.0/16"] }
    to: { ports: [8081] }
"#;

    #[test]
    fn matching_and_precedence_table() {
        use Verdict::*;
        let p = policy(RULES);
        let cases: &[(Option<&str>, &str, u16, Verdict, &str)] = &[
            (
                Some("spiffe://td/ns/payments/sa/api"),
                "10.0.0.1",
                8080,
                Allow,
                "payments-prefix",
            ),
            (
                Some("spiffe://td/ns/payments/sa/api"),
                "10.0.0.1",
                9005,
                Allow,
                "payments-prefix",
            ),
            (
                Some("spiffe://td/ns/payments/sa/api"),
                "10.0.0.1",
                9011,
                Deny,
                "default deny",
            ),
            (
                Some("spiffe://td/ns/payments/sa/api"),
                "10.0.0.1",
                9090,
                Deny,
                "default deny",
            ),
            // Deny wins over the allowing prefix rule, whatever the order.
            (
                Some("spiffe://td/ns/payments/sa/legacy"),
                "10.0.0.1",
                8080,
                Deny,
                "block-legacy",
            ),
            (
                Some("spiffe://td/ns/web/sa/frontend"),
                "10.0.0.1",
                8080,
                Allow,
                "exact-web",
            ),
            (
                Some("spiffe://td/ns/web/sa/frontend-2"),
                "10.0.0.1",
                8080,
                Deny,
                "default deny",
            ),
            // A prefix is a path prefix, not a string prefix.
            (
                Some("spiffe://td/ns/payments-evil/sa/x"),
                "10.0.0.1",
                8080,
                Deny,
                "default deny",
            ),
            (None, "10.9.1.1", 8081, Allow, "plaintext-health"),
            (None, "10.8.1.1", 8081, Deny, "default deny"),
            (
                Some("spiffe://td/ns/web/sa/frontend"),
                "10.9.1.1",
                8081,
                Deny,
                "default deny",
            ),
        ];
        for (id, src, port, verdict, rule) in cases {
            assert_eq!(
                l4(&p, *id, src, *port),
                (*verdict, rule.to_string()),
                "{id:?} {src} {port}"
            );
        }
    }

    #[test]
    fn defaults() {
        use Verdict::*;
        let all = policy("default: all\n");
        assert_eq!(l4(&all, None, "10.0.0.1", 1), (Allow, "default all".into()));
        let auth = policy("default: authenticated\n");
        assert_eq!(
            l4(&auth, Some("spiffe://td/x"), "10.0.0.1", 1),
            (Allow, "default authenticated".into())
        );
        assert_eq!(
            l4(&auth, Some("spiffe://other/x"), "10.0.0.1", 1),
            (Deny, "default authenticated".into())
        );
        assert_eq!(
            l4(&auth, None, "10.0.0.1", 1),
            (Deny, "default authenticated".into())
        );
        assert_eq!(
            l4(&Policy::deny_all("x"), Some("spiffe://td/x"), "10.0.0.1", 1),
            (Deny, "default deny".into())
        );
    }

    #[test]
    fn audit_reports_but_allows() {
        let p = policy("audit: true\nrules:\n  - name: no\n    action: deny\n");
        let d = p.decide_l4(
            &Conn {
                identity: None,
                src: "10.0.0.1".parse().unwrap(),
                port: 80,
                client_cert: None,
            },
            TD,
        );
        assert_eq!(
            (d.verdict, d.rule.as_str(), d.audit_denied),
            (Verdict::Allow, "no", true)
        );
    }

    #[test]
    fn http_rules() {
        let p = policy(
            r#"
rules:
  - name: public-get
    action: allow
    to: { ports: [8080] }
    http: { methods: [GET], paths: ["/public", "/static/*"] }
  - name: no-admin
    action: deny
    http: { paths: ["/admin*"] }
  - name: needs-header
    action: allow
    http: { methods: [POST], paths: ["/api/*"], headers: { x-env: prod } }
"#,
        );
        let c = Conn {
            identity: Some("spiffe://td/a"),
            src: "10.0.0.1".parse().unwrap(),
            port: 8080,
            client_cert: None,
        };
        assert_eq!(p.decide_l4(&c, TD).verdict, Verdict::InspectHttp);
        let none = |_: &str, _: &str| false;
        let prod = |k: &str, v: &str| k == "x-env" && v == "prod";
        type Headers<'a> = &'a dyn Fn(&str, &str) -> bool;
        let cases: &[(&str, &str, Headers, Verdict, &str)] = &[
            ("GET", "/public", &none, Verdict::Allow, "public-get"),
            ("GET", "/public?x=1", &none, Verdict::Allow, "public-get"),
            ("get", "/static/app.js", &none, Verdict::Allow, "public-get"),
            ("POST", "/public", &none, Verdict::Deny, "default deny"),
            ("GET", "/admin", &none, Verdict::Deny, "no-admin"),
            ("GET", "/administrator", &none, Verdict::Deny, "no-admin"),
            ("POST", "/api/x", &prod, Verdict::Allow, "needs-header"),
            ("POST", "/api/x", &none, Verdict::Deny, "default deny"),
        ];
        for (method, path, has_header, verdict, rule) in cases {
            let r = Request {
                method,
                path,
                has_header,
                claims: None,
            };
            let d = p.decide_http(&c, &r, TD);
            assert_eq!(
                (d.verdict, d.rule.as_str()),
                (*verdict, *rule),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn client_certificate_rules_match_edge_clients_by_san_and_subject() {
        let p = policy(
            r#"
rules:
  - name: partners
    action: allow
    from: { client_cert: { sans: ["*.partner.example"], subjects: ["O=Partner, CN=*"] } }
  - name: alice
    action: allow
    from: { client_cert: { sans: ["spiffe://partner/alice"] } }
"#,
        );
        let cert = |subject: &str, dns: &[&str], uris: &[&str]| CertFacts {
            subject: subject.into(),
            dns: dns.iter().map(|d| d.to_string()).collect(),
            uris: uris.iter().map(|u| u.to_string()).collect(),
            ..Default::default()
        };
        let decide = |c: Option<&CertFacts>| {
            let conn = Conn {
                identity: None,
                src: "10.0.0.1".parse().unwrap(),
                port: 443,
                client_cert: c,
            };
            let d = p.decide_l4(&conn, TD);
            (d.verdict, d.rule)
        };
        let partner = cert("O=Partner, CN=api", &["api.partner.example"], &[]);
        assert_eq!(decide(Some(&partner)), (Verdict::Allow, "partners".into()));
        // Both lists must match: the right SAN under another subject is not a partner.
        let other = cert("O=Other, CN=api", &["api.partner.example"], &[]);
        assert_eq!(decide(Some(&other)), (Verdict::Deny, "default deny".into()));
        let alice = cert("CN=alice", &[], &["spiffe://partner/alice"]);
        assert_eq!(decide(Some(&alice)), (Verdict::Allow, "alice".into()));
        // No certificate: no client_cert rule applies.
        assert_eq!(decide(None), (Verdict::Deny, "default deny".into()));
        let bad = PolicyFile::parse(
            "p.yaml",
            "rules:\n  - name: a\n    action: allow\n    from: { client_cert: { sans: [\"a*b*\"] } }\n",
        );
        assert!(bad.unwrap_err().to_string().contains("may only end a name"));
        // `*.` covers names below the domain, not the domain itself.
        let apex = cert("O=Partner, CN=x", &["partner.example"], &[]);
        assert_eq!(decide(Some(&apex)), (Verdict::Deny, "default deny".into()));
    }

    #[test]
    fn faults_belong_to_allow_rules_and_come_with_their_decision() {
        let bad = [
            (
                "action: deny\n    fault: { delay_ms: 5 }",
                "only an allow rule",
            ),
            (
                "action: allow\n    fault: { abort_status: 503 }",
                "needs an http rule",
            ),
            (
                "action: allow\n    http: { paths: [\"/*\"] }\n    fault: { reset: true }",
                "reset is for connection rules",
            ),
            (
                "action: allow\n    fault: { percent: 50 }",
                "it does nothing",
            ),
            (
                "action: allow\n    fault: { reset: true, percent: 150 }",
                "0 to 100",
            ),
        ];
        for (rule, why) in bad {
            let text = format!("rules:\n  - name: f\n    {rule}\n");
            let e = PolicyFile::parse("p.yaml", &text).unwrap_err().to_string();
            assert!(e.contains(why), "{rule}: {e}");
        }
        let p = policy("rules:\n  - name: f\n    action: allow\n    http: { paths: [\"/x\"] }\n    fault: { abort_status: 503, delay_ms: 10, percent: 25 }\n");
        let none = |_: &str, _: &str| false;
        let c = Conn {
            identity: None,
            src: "10.0.0.1".parse().unwrap(),
            port: 80,
            client_cert: None,
        };
        let r = Request {
            method: "GET",
            path: "/x",
            has_header: &none,
            claims: None,
        };
        let fault = p.decide_http(&c, &r, TD).fault.expect("the rule's fault");
        assert_eq!(fault.to_string(), "delay 10 ms, abort 503 for 25%");
        let other = Request { path: "/y", ..r };
        assert_eq!(
            p.decide_http(&c, &other, TD).fault,
            None,
            "a default decision has no fault"
        );
    }

    #[test]
    fn rate_limits_fit_their_rule_and_keep_their_buckets_across_decisions() {
        let bad = [
            ("action: deny\n    rate_limit: { key: all, per_second: 1 }", "only an allow rule"),
            ("action: allow\n    rate_limit: { key: all }", "give per_second"),
            ("action: allow\n    rate_limit: { key: all, per_second: 0 }", "above 0"),
            ("action: allow\n    rate_limit: { key: jwt_sub, per_second: 1 }", "needs an http rule"),
            (
                "action: allow\n    http: { paths: [\"/*\"] }\n    rate_limit: { key: identity, concurrent: 3 }",
                "concurrent is for connection rules",
            ),
            ("action: allow\n    rate_limit: { key: everyone, per_second: 1 }", "unknown variant"),
        ];
        for (rule, why) in bad {
            let text = format!("rules:\n  - name: r\n    {rule}\n");
            let e = PolicyFile::parse("p.yaml", &text).unwrap_err().to_string();
            assert!(e.contains(why), "{rule}: {e}");
        }
        let text = "rules:\n  - name: r\n    action: allow\n    rate_limit: { key: source_ip, per_second: 1, burst: 1 }\n";
        let p = policy(text);
        let c = Conn {
            identity: None,
            src: "10.0.0.1".parse().unwrap(),
            port: 80,
            client_cert: None,
        };
        let limit = |p: &Policy| p.decide_l4(&c, TD).rate_limit.expect("the rule's limit");
        let caller = crate::ratelimit::Caller {
            identity: None,
            ip: c.src,
            subject: None,
        };
        assert!(limit(&p).0.admit(&caller).is_ok());
        assert!(
            limit(&p).0.admit(&caller).is_err(),
            "the second decision shares the first one's bucket"
        );
        // A reload of the same limit keeps the empty bucket.
        let reloaded = policy(text);
        reloaded.adopt_rate_limits(&p);
        assert!(limit(&reloaded).0.admit(&caller).is_err());
    }

    #[test]
    fn bad_files_name_line_and_reason() {
        let cases = [
            ("rules:\n  - name: a\n    action: allow\n    from: { cidrs: [\"10.0.0.0/33\"] }\n", 4, "not a CIDR"),
            ("rules:\n  - name: a\n    action: allow\n    to: { ports: [70000] }\n", 4, "not a port"),
            ("rules:\n  - name: a\n    action: allow\n    to: { ports: [\"90-80\"] }\n", 4, "range is empty"),
            ("rules:\n  - name: a\n    action: allow\n    from: { identities: [\"spiffe://td/*/x\"] }\n", 4, "`*` may only"),
            ("rules:\n  - name: a\n    action: maybe\n", 3, "unknown variant"),
            ("rules:\n  - name: a\n    action: allow\n    form: {}\n", 4, "unknown field `form`"),
            ("default: deny\nrules: [\n", 3, ""),
        ];
        for (yaml, line, reason) in cases {
            match PolicyFile::parse("p.yaml", yaml) {
                Err(PolicyError::Invalid {
                    line: l, reason: r, ..
                }) => {
                    assert_eq!(l, line, "{yaml}: {r}");
                    assert!(r.contains(reason), "{yaml}: {r}");
                }
                other => panic!("{yaml}: expected a located error, got {other:?}"),
            }
        }
        let dup = PolicyFile::parse(
            "p.yaml",
            "rules:\n  - {name: a, action: allow}\n  - {name: a, action: deny}\n",
        );
        assert!(dup.unwrap_err().to_string().contains("used twice"));
    }
}
