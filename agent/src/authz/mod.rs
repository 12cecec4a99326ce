//! Authorization: every inbound connection to an enrolled port is decided by the pod's
//! policy before a byte reaches the application. Default deny, deny wins over allow,
//! audit mode, and hot reload that keeps the last good policy when a new file is bad.

pub mod cli;
mod engine;
mod policy;

pub use engine::{Conn, Decision, Policy, Request, Verdict};
pub use policy::{DefaultAction, PolicyError, PolicyFile};

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
};

use tracing::{error, info, warn};

/// The policy a pod is decided by now; swapped atomically on reload.
pub struct PolicyStore {
    pod: String,
    /// The file, or `None` for the built-in deny-all policy.
    path: Option<PathBuf>,
    current: RwLock<Arc<Policy>>,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStore")
            .field("pod", &self.pod)
            .field("path", &self.path)
            .finish()
    }
}

pub const BUILTIN: &str = "built-in (no policy configured: default deny)";

impl PolicyStore {
    pub fn load(pod: &str, path: Option<PathBuf>) -> Result<Arc<Self>, PolicyError> {
        let policy = match &path {
            Some(p) => Policy::compile(p.display().to_string(), PolicyFile::load(p)?),
            None => {
                warn!(
                    pod,
                    "no policy configured: every inbound connection is denied (default deny)"
                );
                Policy::deny_all(BUILTIN)
            }
        };
        info!(pod, source = %policy.source, rules = policy.rule_count(), default = ?policy.default,
              audit = policy.audit, "policy loaded");
        Ok(Arc::new(Self {
            pod: pod.to_string(),
            path,
            current: RwLock::new(Arc::new(policy)),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        }))
    }

    pub fn current(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the file again; a bad file is rejected and the last good policy stays.
    pub fn reload(&self) {
        let Some(path) = &self.path else { return };
        match PolicyFile::load(path) {
            Ok(file) => {
                let policy = Policy::compile(path.display().to_string(), file);
                info!(pod = %self.pod, source = %policy.source, rules = policy.rule_count(),
                      default = ?policy.default, audit = policy.audit, "policy reloaded");
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                error!(pod = %self.pod, error = %e, "policy reload rejected; the last good policy keeps deciding");
            }
        }
    }

    pub fn watch(self: &Arc<Self>) -> Option<notify::Result<notify::RecommendedWatcher>> {
        let path = self.path.as_ref()?;
        Some(crate::watch::watch(
            &[path],
            format!("policy-{}", self.pod),
            Arc::downgrade(self),
            Self::reload,
        ))
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
