//! What one pod, and the whole node, may hold at once: open connections and mutual TLS
//! handshakes in flight. Each is a semaphore per pod and one for the node; a connection
//! takes the pod's permit first, so a pod at its own limit never uses up the node's
//! permits, and the per-pod limit being below the node's is what keeps one pod from
//! starving the others. Over a limit, a new connection is shed (reset) with a reason and a
//! counter; what is already open is never touched.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    ratelimit::{self, Held, LimitSpec, Limited, Limiter},
    spec::LimitsSpec,
    telemetry::metrics::RateLimitLabels,
};

/// The limits, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LimitSettings {
    pub connections_per_pod: usize,
    pub connections: usize,
    pub handshakes_per_pod: usize,
    pub handshakes: usize,
}

impl Default for LimitSettings {
    /// Room for the bench's 10,000 held mutual TLS connections in one pod (each is two on
    /// the node: the client pod's outbound and the server pod's inbound), and for a burst
    /// of connects as large as a pod's accept queue (4,096) all handshaking at once: the
    /// suite's 2,000 simultaneous connects must all succeed (`burst.rs`), and at 1,024
    /// handshakes per pod 89 of them were shed.
    fn default() -> Self {
        Self {
            connections_per_pod: 16_384,
            connections: 65_536,
            handshakes_per_pod: 4_096,
            handshakes: 16_384,
        }
    }
}

/// One scope's semaphores (a pod's, or the node's).
#[derive(Debug)]
pub struct Limits {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    /// When a shed was last logged (ms since the epoch): one warning a second at most.
    last_warned_ms: AtomicU64,
}

impl Limits {
    pub fn for_pod(s: &LimitSettings) -> Self {
        Self::new(s.connections_per_pod, s.handshakes_per_pod)
    }

    pub fn for_node(s: &LimitSettings) -> Self {
        Self::new(s.connections, s.handshakes)
    }

    fn new(connections: usize, handshakes: usize) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(connections)),
            handshakes: Arc::new(Semaphore::new(handshakes)),
            last_warned_ms: AtomicU64::new(0),
        }
    }

    /// Whether a shed now should be logged (else it is only counted).
    pub fn should_warn(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_warned_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 1_000
            && self
                .last_warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// The pod's `[pod.limits]` with their buckets: what one caller may ask of the pod.
#[derive(Debug, Default)]
pub struct CallerLimits {
    /// New inbound connections per second, and open ones, per key.
    pub connections: Option<Limiter>,
    /// HTTP requests per second per key.
    pub requests: Option<Limiter>,
    /// Ports whose every request is inspected for these limits.
    ports: Vec<u16>,
    pub max_request_headers: Option<usize>,
    pub max_request_bytes: Option<u64>,
}

impl CallerLimits {
    pub fn new(spec: Option<&LimitsSpec>) -> Self {
        let Some(s) = spec else {
            return Self::default();
        };
        Self {
            connections: s.connections.map(Limiter::new),
            requests: s.requests.map(Limiter::new),
            ports: s.ports.clone(),
            max_request_headers: s.max_request_headers,
            max_request_bytes: s.max_request_bytes,
        }
    }

    /// Whether connections to `port` must be served as HTTP so that these limits see
    /// every request.
    pub fn forces_inspection(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }
}

/// Whose limit refused: the pod's own (`[pod.limits]`) or an allow rule's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    Pod,
    Rule(&'a str),
}

/// A caller refused by a rate limit, with what an operator and the client need to know.
#[derive(Debug, Clone)]
pub struct RateLimited {
    pub rule: Option<String>,
    /// What was counted: `requests`, `connections` or `concurrent` (open connections).
    pub kind: &'static str,
    pub why: Limited,
    pub spec: LimitSpec,
}

impl RateLimited {
    pub fn labels(&self, pod: &str) -> RateLimitLabels {
        RateLimitLabels {
            pod: pod.to_string(),
            scope: if self.rule.is_some() { "rule" } else { "pod" },
            rule: self.rule.clone().unwrap_or_default(),
            kind: self.kind,
            key: self.spec.key.as_str(),
        }
    }

    /// The limit's name for logs: `rule `x`` or `[pod.limits]`.
    pub fn limit(&self) -> String {
        match &self.rule {
            Some(r) => format!("rule `{r}`"),
            None => "[pod.limits]".into(),
        }
    }
}

impl std::fmt::Display for RateLimited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.why {
            Limited::Concurrent => "too many open connections".to_string(),
            Limited::Rate { .. } => format!("too many {}", self.kind),
        };
        write!(
            f,
            "{what}: rate limited by {} ({}); retry in {} s",
            self.limit(),
            self.spec,
            self.why.retry_after_secs()
        )
    }
}

/// Counts `caller` against `limiter` (`counts`: `requests` or `connections`).
pub fn admit(
    limiter: &Limiter,
    caller: &ratelimit::Caller<'_>,
    scope: Scope<'_>,
    counts: &'static str,
) -> Result<Held, RateLimited> {
    limiter.admit(caller).map_err(|why| RateLimited {
        rule: match scope {
            Scope::Pod => None,
            Scope::Rule(r) => Some(r.to_string()),
        },
        kind: match why {
            Limited::Concurrent => "concurrent",
            Limited::Rate { .. } => counts,
        },
        why,
        spec: *limiter.spec(),
    })
}

/// Why a new connection was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    PodConnections,
    NodeConnections,
    PodHandshakes,
    NodeHandshakes,
}

impl Shed {
    /// The reason label of counters and access records.
    pub fn reason(self) -> &'static str {
        match self {
            Shed::PodConnections => "pod_connection_limit",
            Shed::NodeConnections => "node_connection_limit",
            Shed::PodHandshakes => "pod_handshake_limit",
            Shed::NodeHandshakes => "node_handshake_limit",
        }
    }
}

impl std::fmt::Display for Shed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, key) = match self {
            Shed::PodConnections => ("the pod's connections", "max_connections_per_pod"),
            Shed::NodeConnections => ("the node's connections", "max_connections"),
            Shed::PodHandshakes => ("the pod's handshakes in flight", "max_handshakes_per_pod"),
            Shed::NodeHandshakes => ("the node's handshakes in flight", "max_handshakes"),
        };
        write!(
            f,
            "overloaded: {what} are at their limit (raise `{key}` if this load is expected)"
        )
    }
}

/// Held for as long as the connection (or the handshake) lasts.
#[derive(Debug)]
pub struct Permit {
    _pod: OwnedSemaphorePermit,
    _node: OwnedSemaphorePermit,
}

/// A slot for one more open connection of the pod, or why there is none.
pub fn connection(pod: &Limits, node: &Limits) -> Result<Permit, Shed> {
    take(
        &pod.connections,
        &node.connections,
        Shed::PodConnections,
        Shed::NodeConnections,
    )
}

/// A slot for one more mutual TLS handshake of the pod, or why there is none.
pub fn handshake(pod: &Limits, node: &Limits) -> Result<Permit, Shed> {
    take(
        &pod.handshakes,
        &node.handshakes,
        Shed::PodHandshakes,
        Shed::NodeHandshakes,
    )
}

fn take(
    pod: &Arc<Semaphore>,
    node: &Arc<Semaphore>,
    pod_full: Shed,
    node_full: Shed,
) -> Result<Permit, Shed> {
    let pod = pod.clone().try_acquire_owned().map_err(|_| pod_full)?;
    let node = node.clone().try_acquire_owned().map_err(|_| node_full)?;
    Ok(Permit {
        _pod: pod,
        _node: node,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(per_pod: usize, node: usize) -> LimitSettings {
        LimitSettings {
            connections_per_pod: per_pod,
            connections: node,
            handshakes_per_pod: per_pod,
            handshakes: node,
        }
    }

    #[test]
    fn a_pod_at_its_limit_is_shed_and_another_pod_is_not() {
        let s = settings(2, 3);
        let (a, b, node) = (
            Limits::for_pod(&s),
            Limits::for_pod(&s),
            Limits::for_node(&s),
        );
        let held: Vec<_> = (0..2).map(|_| connection(&a, &node).unwrap()).collect();
        assert_eq!(connection(&a, &node).unwrap_err(), Shed::PodConnections);
        // The shed attempt took nothing from the node: b still gets the last node slot.
        let b1 = connection(&b, &node).unwrap();
        assert_eq!(connection(&b, &node).unwrap_err(), Shed::NodeConnections);
        drop(held);
        assert!(connection(&b, &node).is_ok());
        drop(b1);
    }

    #[test]
    fn handshakes_are_limited_apart_from_connections() {
        let s = settings(1, 8);
        let (a, node) = (Limits::for_pod(&s), Limits::for_node(&s));
        let _conn = connection(&a, &node).unwrap();
        let hs = handshake(&a, &node).unwrap();
        assert_eq!(handshake(&a, &node).unwrap_err(), Shed::PodHandshakes);
        drop(hs);
        assert!(handshake(&a, &node).is_ok());
        assert!(Shed::NodeHandshakes.to_string().contains("max_handshakes"));
    }
}
