//! Prometheus metrics (OpenMetrics text via prometheus-client), and the registry of live and
//! recently closed connections that the admin API and `agent explain` read.
//!
//! Names follow Prometheus conventions: `agent_` prefix, `_total` counters, base units
//! (seconds, bytes), labels for direction, outcome, reason, rule.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::atomic::{AtomicU64, Ordering},
};

use dashmap::DashMap;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use serde::Serialize;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub direction: &'static str,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: &'static str,
    /// `sent` (from the connection's initiator) or `received` (back to it).
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub direction: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    pub pod: String,
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthnLabels {
    pub pod: String,
    pub reason: &'static str,
}

/// A refusal by a rate limit: the pod's own (`scope="pod"`, `rule=""`) or a rule's, what
/// it counts (`kind`: requests, connections, concurrent) and by what key.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    pub pod: String,
    pub scope: &'static str,
    pub rule: String,
    pub kind: &'static str,
    pub key: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub pod: String,
    /// `inbound`, `http` (per request) or `egress`.
    pub scope: &'static str,
    pub decision: &'static str,
    pub rule: String,
}

/// How many closed connections `explain` can still find.
const RECENT: usize = 4096;

/// One connection as the admin API shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnInfo {
    pub id: u64,
    pub pod: String,
    pub direction: &'static str,
    /// How the kernel brought the connection to the agent.
    pub intercepted_by: &'static str,
    pub src: String,
    pub dst: String,
    pub via: String,
    pub tls: &'static str,
    pub peer_identity: String,
    pub peer_serial: String,
    /// Edge TLS: the subject of the client certificate the client presented, if any.
    pub client_cert: String,
    /// Edge TLS: the negotiated ALPN protocol (`h2`, `http/1.1`, or empty).
    pub alpn: String,
    pub policy_rule: String,
    /// The last fault a rule injected into this connection (or one of its requests).
    pub fault: String,
    /// Inbound: what the first bytes were (`agent_tls`, `tls`, `plaintext`, `timeout`).
    pub detected: &'static str,
    /// How long the mutual TLS handshake took.
    pub handshake_ms: Option<u64>,
    pub state: &'static str,
    pub outcome: String,
    pub reason: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub started_unix_ms: u64,
    pub duration_ms: u64,
}

pub struct Metrics {
    registry: Registry,
    pub opened: Family<DirLabels, Counter>,
    pub closed: Family<CloseLabels, Counter>,
    pub active: Family<DirLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub handshake_failures: Family<ReasonLabels, Counter>,
    pub handshake_seconds: Family<DirLabels, Histogram>,
    pub authz: Family<AuthzLabels, Counter>,
    pub shed: Family<ShedLabels, Counter>,
    pub authn_rejected: Family<AuthnLabels, Counter>,
    pub rate_limited: Family<RateLimitLabels, Counter>,
    /// Sharded maps, so connections opening and closing on every core do not queue on one
    /// lock.
    live: DashMap<u64, ConnInfo>,
    /// Closed connections by the order they closed in; only the last [`RECENT`] are kept.
    recent: DashMap<u64, ConnInfo>,
    closed_seq: AtomicU64,
    events: EventCounters,
}

/// Named event counters of the proxy (handshake failures by reason, refusals,
/// downgrades), logged when the agent stops.
#[derive(Default)]
pub struct EventCounters {
    counts: DashMap<String, AtomicU64>,
}

impl EventCounters {
    pub fn count(&self, name: &str) {
        if let Some(c) = self.counts.get(name) {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.counts
            .entry(name.to_string())
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts
            .iter()
            .map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed)))
            .collect()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("agent");
        let opened = Family::<DirLabels, Counter>::default();
        let closed = Family::<CloseLabels, Counter>::default();
        let active = Family::<DirLabels, Gauge>::default();
        let bytes = Family::<BytesLabels, Counter>::default();
        let handshake_failures = Family::<ReasonLabels, Counter>::default();
        let handshake_seconds = Family::<DirLabels, Histogram>::new_with_constructor(|| {
            // 100 µs .. ~1.6 s: handshakes on a node are sub-millisecond to a few ms.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 15,
            ))
        });
        let authz = Family::<AuthzLabels, Counter>::default();
        let shed = Family::<ShedLabels, Counter>::default();
        let authn_rejected = Family::<AuthnLabels, Counter>::default();
        registry.register(
            "authn_rejected",
            "HTTP requests answered 401 because no valid bearer token came, by reason",
            authn_rejected.clone(),
        );
        let rate_limited = Family::<RateLimitLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests answered 429 and connections refused by a rate limit",
            rate_limited.clone(),
        );
        registry.register(
            "connections_shed",
            "New connections refused because a limit was reached, by reason",
            shed.clone(),
        );
        registry.register(
            "connections_opened",
            "Connections accepted by the proxy",
            opened.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections ended, by outcome",
            closed.clone(),
        );
        registry.register("connections_active", "Connections open now", active.clone());
        registry.register("bytes", "Bytes proxied", bytes.clone());
        registry.register(
            "tls_handshake_failures",
            "Mutual TLS handshakes that failed, by reason",
            handshake_failures.clone(),
        );
        registry.register(
            "tls_handshake_duration_seconds",
            "Time to complete a mutual TLS handshake",
            handshake_seconds.clone(),
        );
        registry.register(
            "authz_decisions",
            "Authorization decisions, by the rule that made them",
            authz.clone(),
        );
        Self {
            registry,
            opened,
            closed,
            active,
            bytes,
            handshake_failures,
            handshake_seconds,
            authz,
            shed,
            authn_rejected,
            rate_limited,
            live: DashMap::new(),
            recent: DashMap::new(),
            closed_seq: AtomicU64::new(0),
            events: EventCounters::default(),
        }
    }

    /// Counts one named event (see [`EventCounters`]).
    pub fn count(&self, name: &str) {
        self.events.count(name);
    }

    pub fn events(&self) -> BTreeMap<String, u64> {
        self.events.snapshot()
    }

    pub fn authz(&self, pod: &str, scope: &'static str, allow: bool, rule: &str) {
        self.authz
            .get_or_create(&AuthzLabels {
                pod: pod.to_string(),
                scope,
                decision: if allow { "allow" } else { "deny" },
                rule: rule.to_string(),
            })
            .inc();
    }

    pub fn authn(&self, pod: &str, reason: &'static str) {
        self.authn_rejected
            .get_or_create(&AuthnLabels {
                pod: pod.to_string(),
                reason,
            })
            .inc();
    }

    pub fn rate_limited(&self, labels: RateLimitLabels) {
        self.rate_limited.get_or_create(&labels).inc();
    }

    pub fn shed(&self, pod: &str, direction: &'static str, reason: &'static str) {
        self.shed
            .get_or_create(&ShedLabels {
                pod: pod.to_string(),
                direction,
                reason,
            })
            .inc();
    }

    pub fn handshake_done(&self, direction: &'static str, started: std::time::Instant) {
        self.handshake_seconds
            .get_or_create(&DirLabels { direction })
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn handshake_failed(&self, direction: &'static str, reason: &str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels {
                direction,
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn conn_opened(&self, info: ConnInfo) {
        self.opened
            .get_or_create(&DirLabels {
                direction: info.direction,
            })
            .inc();
        self.active
            .get_or_create(&DirLabels {
                direction: info.direction,
            })
            .inc();
        self.live.insert(info.id, info);
    }

    pub fn conn_update(&self, id: u64, f: impl FnOnce(&mut ConnInfo)) {
        if let Some(mut c) = self.live.get_mut(&id) {
            f(&mut c);
        }
    }

    pub fn conn_closed(&self, id: u64, f: impl FnOnce(&mut ConnInfo)) {
        let Some((_, mut c)) = self.live.remove(&id) else {
            return;
        };
        f(&mut c);
        c.state = "closed";
        self.active
            .get_or_create(&DirLabels {
                direction: c.direction,
            })
            .dec();
        self.closed
            .get_or_create(&CloseLabels {
                direction: c.direction,
                outcome: c.outcome.clone(),
            })
            .inc();
        self.bytes
            .get_or_create(&BytesLabels {
                direction: c.direction,
                flow: "sent",
            })
            .inc_by(c.bytes_sent);
        self.bytes
            .get_or_create(&BytesLabels {
                direction: c.direction,
                flow: "received",
            })
            .inc_by(c.bytes_received);
        let seq = self.closed_seq.fetch_add(1, Ordering::Relaxed);
        self.recent.insert(seq, c);
        if let Some(old) = seq.checked_sub(RECENT as u64) {
            self.recent.remove(&old);
        }
    }

    pub fn live(&self) -> Vec<ConnInfo> {
        let mut v: Vec<ConnInfo> = self.live.iter().map(|e| e.value().clone()).collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// A connection by id or by its client address (`ip:port` as the agent saw it), live
    /// first, then the most recent closed one; with the other leg when the agent proxied
    /// both ends (the outbound leg whose source is this connection's client, or the
    /// inbound leg this outbound connection became).
    pub fn find(&self, key: &str) -> Option<(ConnInfo, Option<ConnInfo>)> {
        let primary = self.search(|c| c.id.to_string() == key || c.src == key)?;
        let other = if primary.direction == "inbound" {
            self.search(|c| c.direction == "outbound" && !c.via.is_empty() && c.via == primary.src)
        } else {
            self.search(|c| {
                c.direction == "inbound" && !primary.via.is_empty() && c.src == primary.via
            })
        };
        Some((primary, other))
    }

    fn search(&self, hit: impl Fn(&ConnInfo) -> bool) -> Option<ConnInfo> {
        if let Some(c) = self.live.iter().find(|c| hit(c.value())) {
            return Some(c.value().clone());
        }
        // The most recent match: the last to close.
        self.recent
            .iter()
            .filter(|c| hit(c.value()))
            .max_by_key(|c| *c.key())
            .map(|c| c.value().clone())
    }

    /// The exposition text: the registry, plus `extra` families (kernel counters, reloads,
    /// certificate expiry) gathered at scrape time.
    pub fn encode(&self, extra: &str) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        let body = out.strip_suffix("# EOF\n").unwrap_or(&out).to_string();
        let mut text = body;
        text.push_str(extra);
        text.push_str("# EOF\n");
        text
    }
}

/// Appends one counter family in OpenMetrics text.
pub fn write_counter(
    out: &mut String,
    name: &str,
    help: &str,
    samples: &[(Vec<(&str, String)>, u64)],
) {
    let _ = writeln!(out, "# HELP agent_{name} {help}.");
    let _ = writeln!(out, "# TYPE agent_{name} counter");
    for (labels, v) in samples {
        let _ = writeln!(out, "agent_{name}_total{{{}}} {v}", labels_text(labels));
    }
}

/// Appends one gauge family in OpenMetrics text.
pub fn write_gauge(
    out: &mut String,
    name: &str,
    help: &str,
    samples: &[(Vec<(&str, String)>, i64)],
) {
    let _ = writeln!(out, "# HELP agent_{name} {help}.");
    let _ = writeln!(out, "# TYPE agent_{name} gauge");
    for (labels, v) in samples {
        let _ = writeln!(out, "agent_{name}{{{}}} {v}", labels_text(labels));
    }
}

fn labels_text(labels: &[(&str, String)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect::<Vec<_>>()
        .join(",")
}
