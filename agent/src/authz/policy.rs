//! The policy file: YAML, validated while it is parsed so that every error carries the
//! file, line and column of the offending value.

use std::{fmt, net::IpAddr, path::Path, str::FromStr};

use ipnet::IpNet;
use serde::{de, Deserialize, Deserializer};

use crate::ratelimit::{KeyClass, LimitSpec, Rate, DEFAULT_MAX_KEYS};

/// What happens to traffic no rule matches.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// Least privilege: nothing that is not explicitly allowed.
    #[default]
    Deny,
    /// Any verified identity of the pod's trust domain.
    Authenticated,
    /// Everything.
    All,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub default: DefaultAction,
    /// Evaluate and log, but let denied traffic pass.
    #[serde(default)]
    pub audit: bool,
    #[serde(default)]
    pub rules: Vec<RuleFile>,
    /// Where the pod's applications may connect (outbound). Absent: anywhere.
    pub egress: Option<EgressFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressFile {
    /// For destinations no egress rule matches: `all` (the default) or `deny`.
    #[serde(default = "egress_default")]
    pub default: DefaultAction,
    #[serde(default)]
    pub rules: Vec<EgressRuleFile>,
}

fn egress_default() -> DefaultAction {
    DefaultAction::All
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRuleFile {
    pub name: String,
    pub action: Action,
    #[serde(default)]
    pub to: EgressToFile,
}

/// An egress destination: networks, ports, and (for known workloads) identities.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressToFile {
    #[serde(default)]
    pub cidrs: Vec<Cidr>,
    #[serde(default)]
    pub ports: Vec<PortRange>,
    #[serde(default)]
    pub identities: Vec<IdPattern>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub name: String,
    pub action: Action,
    #[serde(default)]
    pub from: FromFile,
    #[serde(default)]
    pub to: ToFile,
    pub http: Option<HttpFile>,
    /// A fault injected into what this (allow) rule lets through, to rehearse failure.
    pub fault: Option<FaultFile>,
    /// How much of what this (allow) rule lets through one caller may have.
    pub rate_limit: Option<RateLimitFile>,
}

/// `rate_limit: { key, per_second, burst, concurrent, max_keys }`: on an HTTP rule,
/// requests per second per key; on a connection rule, new connections per second and
/// open connections per key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    pub key: KeyClass,
    pub per_second: Option<f64>,
    /// How many may come at once from a full bucket (default: one second's worth).
    pub burst: Option<u32>,
    /// Connection rules: how many connections one key may hold open.
    pub concurrent: Option<u32>,
    /// How many keys are remembered (the least recently seen are forgotten first).
    pub max_keys: Option<usize>,
}

impl RateLimitFile {
    /// The limit, checked against the rule it is on (`per_request`: an HTTP rule).
    pub fn spec(&self, per_request: bool) -> Result<LimitSpec, String> {
        let rate = match self.per_second {
            Some(r) => Some(Rate::new(r, self.burst)?),
            None if self.burst.is_some() => return Err("burst needs per_second".into()),
            None => None,
        };
        match (per_request, self.concurrent) {
            (true, Some(_)) => {
                return Err(
                    "concurrent is for connection rules; an http rule limits per_second".into(),
                )
            }
            (_, Some(0)) => return Err("concurrent: 0 would refuse everything".into()),
            (false, _) if self.key == KeyClass::JwtSub => {
                return Err("key jwt_sub needs an http rule: a connection carries no token".into())
            }
            (_, None) if rate.is_none() => return Err("give per_second (or concurrent)".into()),
            _ => {}
        }
        let max_keys = self.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
        if max_keys == 0 {
            return Err("max_keys: 0 remembers no caller".into());
        }
        Ok(LimitSpec {
            key: self.key,
            rate,
            concurrent: self.concurrent,
            max_keys,
        })
    }
}

/// `fault: { delay_ms, abort_status, percent }` on an HTTP rule, `fault: { reset, percent,
/// delay_ms }` on a connection rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultFile {
    #[serde(default)]
    pub delay_ms: u64,
    /// HTTP rules: answer with this status instead of forwarding.
    pub abort_status: Option<u16>,
    /// Connection rules: reset the connection instead of forwarding.
    #[serde(default)]
    pub reset: bool,
    /// How many of the requests (or connections) get it, 0-100.
    #[serde(default = "all_of_them")]
    pub percent: f64,
}

impl RuleFile {
    /// Whether the rule is decided per HTTP request.
    pub fn per_request(&self) -> bool {
        self.http.is_some() || !self.from.claims.is_empty()
    }
}

fn all_of_them() -> f64 {
    100.0
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromFile {
    #[serde(default)]
    pub identities: Vec<IdPattern>,
    /// Matches connections that presented no identity (plaintext in PERMISSIVE mode).
    #[serde(default)]
    pub unauthenticated: bool,
    #[serde(default)]
    pub cidrs: Vec<Cidr>,
    /// Edge TLS clients whose verified certificate matches (the listener's `client_ca`).
    pub client_cert: Option<ClientCertFile>,
    /// Requests whose verified bearer token has, for every claim named, one of the values
    /// listed (`sub: [alice]`, `groups: [admins]`); decided per request.
    #[serde(default)]
    pub claims: std::collections::BTreeMap<String, Vec<String>>,
}

/// A client certificate condition: any listed SAN (DNS name, URI or email), and any
/// listed subject (as the access log's `client_cert` prints it); an empty list is no
/// condition.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertFile {
    #[serde(default)]
    pub sans: Vec<NamePattern>,
    #[serde(default)]
    pub subjects: Vec<NamePattern>,
}

/// A name: exact, a prefix ending in `*` (`spiffe://partner/*`, `O=Partner, CN=*`), or a
/// DNS suffix starting with `*.` (`*.partner.example`: any name below it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePattern {
    Exact(String),
    Prefix(String),
    /// The suffix including its leading `.`.
    Suffix(String),
}

impl FromStr for NamePattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: `*` may only end a name, or start one as `*.`");
        if s.is_empty() {
            return Err("an empty name matches nothing".into());
        }
        if let Some(rest) = s.strip_prefix('*') {
            return match rest {
                r if r.starts_with('.') && r.len() > 1 && !r.contains('*') => {
                    Ok(Self::Suffix(r.to_string()))
                }
                _ => Err(bad()),
            };
        }
        match s.strip_suffix('*') {
            Some(p) if !p.contains('*') => Ok(Self::Prefix(p.to_string())),
            None if !s.contains('*') => Ok(Self::Exact(s.to_string())),
            _ => Err(bad()),
        }
    }
}

impl NamePattern {
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(e) => e == name,
            Self::Prefix(p) => name.starts_with(p.as_str()),
            Self::Suffix(sfx) => name.len() > sfx.len() && name.ends_with(sfx.as_str()),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToFile {
    #[serde(default)]
    pub ports: Vec<PortRange>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFile {
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<PathPattern>,
    /// Required headers: name to exact value.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// A SPIFFE ID, exact or a prefix pattern ending in `/*` (`spiffe://td/ns/payments/*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdPattern {
    Exact(String),
    /// The prefix including its trailing `/`.
    Prefix(String),
}

impl FromStr for IdPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| {
            format!("`{s}` is not a SPIFFE ID pattern (must start with spiffe://)")
        })?;
        if let Some(prefix) = s.strip_suffix("/*") {
            if prefix.contains('*') || rest.len() < 3 {
                return Err(format!("`{s}`: `*` may only be the whole last segment"));
            }
            return Ok(Self::Prefix(format!("{prefix}/")));
        }
        if s.contains('*') {
            return Err(format!(
                "`{s}`: `*` may only be the whole last segment, as in spiffe://td/ns/x/*"
            ));
        }
        crate::identity::SpiffeId::parse(s)?;
        Ok(Self::Exact(s.to_string()))
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(s) => f.write_str(s),
            Self::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// A source network (a bare address is a host route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::types::parse_cidr(s).map(Cidr)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

/// A port or an inclusive range `a-b`, within 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |t: &str| -> Result<u16, String> {
            match t.trim().parse::<u32>() {
                Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
                _ => Err(format!("`{t}` is not a port (1-65535)")),
            }
        };
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!("`{s}`: the range is empty ({lo} > {hi})"));
        }
        Ok(Self { lo, hi })
    }
}

/// An HTTP path: exact, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
}

impl FromStr for PathPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!("`{s}` is not a path (must start with /)"));
        }
        match s.strip_suffix('*') {
            Some(p) if !p.contains('*') => Ok(Self::Prefix(p.to_string())),
            Some(_) => Err(format!("`{s}`: `*` may only end a path")),
            None if s.contains('*') => Err(format!("`{s}`: `*` may only end a path")),
            None => Ok(Self::Exact(s.to_string())),
        }
    }
}

impl PathPattern {
    pub fn matches(&self, path: &str) -> bool {
        // The query string is not part of the path.
        let path = path.split('?').next().unwrap_or(path);
        match self {
            Self::Exact(p) => p == path,
            Self::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

/// Deserialize through `FromStr` (numbers too, for ports) so errors point at the value.
macro_rules! deserialize_via_from_str {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let v = serde_yaml::Value::deserialize(d)?;
                let text = match &v {
                    serde_yaml::Value::String(s) => s.clone(),
                    serde_yaml::Value::Number(n) => n.to_string(),
                    other => {
                        return Err(de::Error::custom(format!(
                            "expected a string, found {other:?}"
                        )))
                    }
                };
                text.parse().map_err(de::Error::custom)
            }
        }
    };
}

deserialize_via_from_str!(IdPattern);
deserialize_via_from_str!(Cidr);
deserialize_via_from_str!(PortRange);
deserialize_via_from_str!(PathPattern);
deserialize_via_from_str!(NamePattern);

/// A rejected policy file: where and why.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("policy {path}:{line}:{column}: {reason}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        reason: String,
    },
    #[error("policy {path}: {reason}")]
    Semantic { path: String, reason: String },
}

impl PolicyFile {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            // serde_yaml appends " at line N column M"; the location is already in front.
            let reason = e.to_string();
            let reason = reason
                .split(" at line ")
                .next()
                .unwrap_or(&reason)
                .to_string();
            PolicyError::Invalid {
                path: path.to_string(),
                line,
                column,
                reason,
            }
        })?;
        let mut names = std::collections::HashSet::new();
        for (i, r) in file.rules.iter().enumerate() {
            if r.name.trim().is_empty() {
                return Err(PolicyError::Semantic {
                    path: path.to_string(),
                    reason: format!(
                        "rules[{i}]: a rule needs a name (decisions are reported by name)"
                    ),
                });
            }
            if let Some(f) = &r.fault {
                let bad = |why: &str| PolicyError::Semantic {
                    path: path.to_string(),
                    reason: format!("rules[{i}] `{}`: fault: {why}", r.name),
                };
                if r.action != Action::Allow {
                    return Err(bad(
                        "only an allow rule can inject a fault (a deny already refuses)",
                    ));
                }
                if !(0.0..=100.0).contains(&f.percent) {
                    return Err(bad("percent is 0 to 100"));
                }
                match (r.http.is_some(), f.abort_status, f.reset) {
                    (_, Some(s), _) if !(200..=599).contains(&s) => {
                        return Err(bad("abort_status is an HTTP status, 200-599"))
                    }
                    (false, Some(_), _) => return Err(bad(
                        "abort_status needs an http rule; a connection rule resets (reset: true)",
                    )),
                    (true, _, true) => {
                        return Err(bad(
                            "reset is for connection rules; an http rule aborts with abort_status",
                        ))
                    }
                    (_, None, false) if f.delay_ms == 0 => {
                        return Err(bad("it does nothing: give delay_ms, abort_status or reset"))
                    }
                    _ => {}
                }
            }
            if let Some(limit) = &r.rate_limit {
                let bad = |why: String| PolicyError::Semantic {
                    path: path.to_string(),
                    reason: format!("rules[{i}] `{}`: rate_limit: {why}", r.name),
                };
                if r.action != Action::Allow {
                    return Err(bad("only an allow rule can be rate limited".into()));
                }
                limit.spec(r.per_request()).map_err(bad)?;
            }
            if !names.insert(r.name.as_str()) {
                return Err(PolicyError::Semantic {
                    path: path.to_string(),
                    reason: format!("rules[{i}]: the name `{}` is used twice", r.name),
                });
            }
        }
        Ok(file)
    }
}
