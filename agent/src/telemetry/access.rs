//! One connection's record. The proxy hands it each typed fact as the connection learns it
//! (the original destination, the verified peer, the permit or denial naming its rule);
//! the record publishes them to the live registry (admin API, `agent conns`, `agent
//! explain`) and writes one JSON access-log line when the connection ends.

use std::{net::SocketAddr, time::Duration};

use tracing::warn;

use super::metrics::{ConnInfo, Metrics};
use crate::{
    authz::{Denial, Permit},
    identity::{CertFacts, PeerIdentity},
    pump::Transfer,
    types::{ClientAddr, Direction, OrigDstAddr, PodName},
};

/// How the first bytes of an inbound connection were classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A ClientHello offering the agent's ALPN.
    AgentTls,
    /// A ClientHello without it: a client outside the mesh (edge TLS, or the
    /// application's own TLS on other ports).
    Tls,
    /// Anything else.
    Plaintext,
    /// Nothing arrived within the detection window: silence, which is not plaintext.
    Timeout,
}

impl Detected {
    pub const fn as_str(self) -> &'static str {
        match self {
            Detected::AgentTls => "agent_tls",
            Detected::Tls => "tls",
            Detected::Plaintext => "plaintext",
            Detected::Timeout => "timeout",
        }
    }
}

/// What happened on a connection whose HTTP requests were decided one by one.
#[derive(Debug, Default)]
pub struct HttpOutcome {
    pub requests: u64,
    pub denied: u64,
    /// Answered 401: no valid bearer token.
    pub unauthenticated: u64,
    /// Requests a rule's fault was injected into.
    pub faults: u64,
    /// Requests answered 429 by a rate limit.
    pub rate_limited: u64,
    /// The first verified token subject (`sub`), never the token.
    pub subject: String,
    pub error: Option<String>,
}

/// What an edge TLS handshake established.
#[derive(Debug, Clone, Default)]
pub struct EdgeTls {
    /// The negotiated ALPN protocol, empty when the client offered none.
    pub alpn: String,
    /// The client certificate, when the listener asked for one.
    pub client_cert: Option<CertFacts>,
}

pub struct Access<'a> {
    id: u64,
    pod: &'a PodName,
    direction: Direction,
    client: ClientAddr,
    dst: Option<OrigDstAddr>,
    /// The agent's own end of the second leg (upstream source outbound, source towards the
    /// application inbound).
    via: Option<SocketAddr>,
    peer: Option<PeerIdentity>,
    handshake: Option<Duration>,
    detected: Option<Detected>,
    /// Served edge TLS by the agent.
    edge: Option<EdgeTls>,
    /// Forwarded without mutual TLS: the policy decided an unauthenticated caller.
    unauthenticated: bool,
    /// The rule that decided the connection (or that it is decided per HTTP request).
    rule: String,
    start: std::time::Instant,
    metrics: &'a Metrics,
    finished: bool,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn opt(v: Option<impl ToString>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

impl<'a> Access<'a> {
    pub fn new(
        id: u64,
        pod: &'a PodName,
        metrics: &'a Metrics,
        direction: Direction,
        client: ClientAddr,
        intercepted_by: &'static str,
    ) -> Self {
        metrics.conn_opened(ConnInfo {
            id,
            pod: pod.to_string(),
            direction: direction.as_str(),
            intercepted_by,
            src: client.to_string(),
            state: "open",
            tls: "none",
            started_unix_ms: now_ms(),
            ..Default::default()
        });
        Self {
            id,
            pod,
            direction,
            client,
            dst: None,
            via: None,
            peer: None,
            handshake: None,
            detected: None,
            edge: None,
            unauthenticated: false,
            rule: String::new(),
            start: std::time::Instant::now(),
            metrics,
            finished: false,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    fn tls(&self) -> &'static str {
        match (&self.peer, &self.edge) {
            (Some(_), _) => "mtls",
            (None, Some(_)) => "edge_tls",
            (None, None) => "none",
        }
    }

    fn peer_identity(&self) -> String {
        match &self.peer {
            Some(p) => p.id.to_string(),
            None if self.unauthenticated => "unauthenticated".into(),
            None => String::new(),
        }
    }

    fn client_cert(&self) -> &str {
        self.edge
            .as_ref()
            .and_then(|e| e.client_cert.as_ref())
            .map_or("", |c| c.subject.as_str())
    }

    fn alpn(&self) -> &str {
        self.edge.as_ref().map_or("", |e| e.alpn.as_str())
    }

    fn fill(&self, c: &mut ConnInfo) {
        c.client_cert = self.client_cert().to_string();
        c.alpn = self.alpn().to_string();
        c.dst = opt(self.dst);
        c.via = opt(self.via);
        c.tls = self.tls();
        c.peer_identity = self.peer_identity();
        c.peer_serial = self
            .peer
            .as_ref()
            .map(|p| p.serial.clone())
            .unwrap_or_default();
        c.policy_rule = self.rule.clone();
        c.detected = self.detected.map_or("", Detected::as_str);
        c.handshake_ms = self.handshake.map(|d| d.as_millis() as u64);
        c.duration_ms = self.start.elapsed().as_millis() as u64;
    }

    fn publish(&self) {
        self.metrics.conn_update(self.id, |c| self.fill(c));
    }

    /// Where the connection was going.
    pub fn dst(&mut self, dst: OrigDstAddr) {
        self.dst = Some(dst);
        self.publish();
    }

    /// The agent's own address on the second leg.
    pub fn via(&mut self, local: Option<SocketAddr>) {
        self.via = local;
        self.publish();
    }

    pub fn detected(&mut self, d: Detected) {
        self.detected = Some(d);
        self.publish();
    }

    /// The connection goes on without mutual TLS (PERMISSIVE).
    pub fn unauthenticated(&mut self) {
        self.unauthenticated = true;
        self.publish();
    }

    /// The peer a completed mutual TLS handshake verified, and how long the handshake took.
    pub fn peer(&mut self, peer: PeerIdentity, handshake: Duration) {
        self.peer = Some(peer);
        self.handshake = Some(handshake);
        self.publish();
    }

    /// A completed edge TLS handshake, and how long it took.
    pub fn edge(&mut self, edge: EdgeTls, handshake: Duration) {
        self.edge = Some(edge);
        self.handshake = Some(handshake);
        self.publish();
    }

    /// The policy allowed the connection; `scope` is `inbound` or `egress`.
    pub fn permitted(&mut self, scope: &'static str, permit: &Permit) {
        self.metrics
            .authz(self.pod.as_str(), scope, true, &permit.rule);
        self.rule = permit.rule.clone();
        self.publish();
    }

    /// The policy decides each HTTP request of this connection on its own.
    pub fn per_request(&mut self) {
        self.rule = "(per HTTP request)".into();
        self.publish();
    }

    /// The policy refused the connection.
    pub fn denied(&mut self, scope: &'static str, denial: &Denial) {
        self.metrics
            .authz(self.pod.as_str(), scope, false, &denial.rule);
        self.rule = denial.rule.clone();
    }

    fn finish(&mut self, outcome: &str, reason: &str, sent: u64, received: u64) {
        self.finished = true;
        self.metrics.conn_closed(self.id, |c| {
            self.fill(c);
            c.outcome = outcome.to_string();
            c.reason = reason.to_string();
            c.bytes_sent = sent;
            c.bytes_received = received;
        });
    }

    /// The connection ended before any byte was proxied.
    pub fn refused(&mut self, outcome: &str, reason: &str, error: &dyn std::fmt::Display) {
        warn!(target: "access", conn = self.id, pod = %self.pod, direction = %self.direction,
              src = %self.client, dst = %opt(self.dst), tls = self.tls(),
              peer_identity = %self.peer_identity(), client_cert = %self.client_cert(),
              alpn = %self.alpn(), policy_rule = %self.rule,
              detected = self.detected.map_or("", Detected::as_str),
              handshake_ms = self.handshake.map(|d| d.as_millis() as u64),
              duration_ms = self.start.elapsed().as_millis() as u64, outcome, reason,
              error = %error, "connection refused");
        self.finish(outcome, reason, 0, 0);
    }

    /// The connection was proxied; `None` means it was cut at the drain deadline.
    pub fn closed(&mut self, transfer: Option<Transfer>) {
        let duration_ms = self.start.elapsed().as_millis() as u64;
        let Some(t) = transfer else {
            warn!(target: "access", conn = self.id, pod = %self.pod, direction = %self.direction,
                  src = %self.client, dst = %opt(self.dst), via = %opt(self.via), tls = self.tls(),
                  peer_identity = %self.peer_identity(), duration_ms,
                  outcome = "aborted_at_shutdown", "connection cut: drain deadline passed");
            return self.finish("aborted_at_shutdown", "drain_deadline", 0, 0);
        };
        let outcome = if t.error.is_some() { "error" } else { "ok" };
        let error = t.error.map(|e| e.to_string()).unwrap_or_default();
        tracing::info!(target: "access", conn = self.id, pod = %self.pod,
              direction = %self.direction, src = %self.client, dst = %opt(self.dst),
              via = %opt(self.via), tls = self.tls(), peer_identity = %self.peer_identity(),
              peer_serial = %self.peer.as_ref().map(|p| p.serial.as_str()).unwrap_or(""),
              policy_rule = %self.rule, detected = self.detected.map_or("", Detected::as_str),
              handshake_ms = self.handshake.map(|d| d.as_millis() as u64),
              bytes_sent = t.sent, bytes_received = t.received, duration_ms, outcome,
              error = %error, "connection closed");
        self.finish(outcome, "", t.sent, t.received);
    }

    /// The end of a connection whose HTTP requests were decided one by one.
    pub fn closed_http(&mut self, outcome: Option<HttpOutcome>) {
        let duration_ms = self.start.elapsed().as_millis() as u64;
        let Some(o) = outcome else {
            return self.closed(None);
        };
        let result = if o.error.is_some() { "error" } else { "ok" };
        tracing::info!(target: "access", conn = self.id, pod = %self.pod,
              direction = %self.direction, src = %self.client, dst = %opt(self.dst),
              tls = self.tls(), peer_identity = %self.peer_identity(),
              peer_serial = %self.peer.as_ref().map(|p| p.serial.as_str()).unwrap_or(""),
              client_cert = %self.client_cert(), alpn = %self.alpn(),
              detected = self.detected.map_or("", Detected::as_str),
              policy_rule = %self.rule, http_requests = o.requests,
              http_denied = o.denied, http_unauthenticated = o.unauthenticated, http_faults = o.faults, http_rate_limited = o.rate_limited, sub = %o.subject,
              duration_ms, outcome = result,
              error = %o.error.unwrap_or_default(), "connection closed");
        self.finish(result, "", 0, 0);
    }
}

impl Drop for Access<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.finish("dropped", "", 0, 0);
        }
    }
}
