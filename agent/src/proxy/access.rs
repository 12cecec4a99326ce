//! One connection's record: filled in as the connection goes, published to the live
//! connection registry (admin API, `agent conns`, `agent explain`), and written once as a
//! JSON access-log line when it ends.

use std::net::SocketAddr;

use tracing::warn;

use super::{http, pump, Pod};
use crate::metrics::{ConnInfo, Metrics};

pub(crate) struct Access<'a> {
    pub id: u64,
    pub pod: &'a Pod,
    pub direction: &'static str,
    pub src: SocketAddr,
    pub dst: Option<SocketAddr>,
    /// The agent's own end of the second leg (upstream source outbound, source towards the
    /// application inbound).
    pub via: String,
    /// "mtls" or "none".
    pub tls: &'static str,
    /// The peer's verified SPIFFE ID, or "unauthenticated".
    pub peer_identity: String,
    /// The serial number of the certificate the peer presented.
    pub peer_serial: String,
    /// The policy rule that decided the connection.
    pub policy_rule: String,
    pub start: std::time::Instant,
    metrics: &'a Metrics,
    finished: bool,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl<'a> Access<'a> {
    pub fn new(
        id: u64,
        pod: &'a Pod,
        metrics: &'a Metrics,
        direction: &'static str,
        src: SocketAddr,
    ) -> Self {
        metrics.conn_opened(ConnInfo {
            id,
            pod: pod.name.to_string(),
            direction,
            intercepted_by: if direction == "outbound" {
                "cgroup/connect4|6 + sock_ops"
            } else {
                "sk_lookup"
            },
            src: src.to_string(),
            state: "open",
            tls: "none",
            started_unix_ms: now_ms(),
            ..Default::default()
        });
        Self {
            id,
            pod,
            direction,
            src,
            dst: None,
            via: String::new(),
            tls: "none",
            peer_identity: String::new(),
            peer_serial: String::new(),
            policy_rule: String::new(),
            start: std::time::Instant::now(),
            metrics,
            finished: false,
        }
    }

    fn dst(&self) -> String {
        self.dst.map(|d| d.to_string()).unwrap_or_default()
    }

    fn fill(&self, c: &mut ConnInfo) {
        c.dst = self.dst();
        c.via = self.via.clone();
        c.tls = self.tls;
        c.peer_identity = self.peer_identity.clone();
        c.peer_serial = self.peer_serial.clone();
        c.policy_rule = self.policy_rule.clone();
        c.duration_ms = self.start.elapsed().as_millis() as u64;
    }

    /// Makes what is known so far visible to `agent conns`.
    pub fn publish(&self) {
        self.metrics.conn_update(self.id, |c| self.fill(c));
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

    /// Records the verified peer of an established TLS connection.
    pub fn tls_peer(&mut self, certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) {
        self.tls = "mtls";
        if let Some(leaf) = certs.and_then(|c| c.first()) {
            self.peer_identity = crate::identity::spiffe_id_of(leaf)
                .map(|id| id.to_string())
                .unwrap_or_default();
            self.peer_serial = crate::identity::serial_of(leaf);
        }
        self.publish();
    }

    /// The connection ended before any byte was proxied.
    pub fn refused(&mut self, outcome: &str, reason: &str, error: &dyn std::fmt::Display) {
        warn!(target: "access", conn = self.id, pod = %self.pod.name, direction = self.direction,
              src = %self.src, dst = %self.dst(), tls = self.tls, peer_identity = %self.peer_identity,
              policy_rule = %self.policy_rule,
              duration_ms = self.start.elapsed().as_millis() as u64, outcome, reason,
              error = %error, "connection refused");
        self.finish(outcome, reason, 0, 0);
    }

    /// The connection was proxied; `None` means it was cut at the drain deadline.
    pub fn closed(&mut self, transfer: Option<pump::Transfer>) {
        let duration_ms = self.start.elapsed().as_millis() as u64;
        let Some(t) = transfer else {
            warn!(target: "access", conn = self.id, pod = %self.pod.name, direction = self.direction,
                  src = %self.src, dst = %self.dst(), via = %self.via, tls = self.tls,
                  peer_identity = %self.peer_identity, duration_ms,
                  outcome = "aborted_at_shutdown", "connection cut: drain deadline passed");
            return self.finish("aborted_at_shutdown", "drain_deadline", 0, 0);
        };
        let outcome = if t.error.is_some() { "error" } else { "ok" };
        let error = t.error.map(|e| e.to_string()).unwrap_or_default();
        tracing::info!(target: "access", conn = self.id, pod = %self.pod.name,
              direction = self.direction, src = %self.src, dst = %self.dst(), via = %self.via,
              tls = self.tls, peer_identity = %self.peer_identity,
              peer_serial = %self.peer_serial, policy_rule = %self.policy_rule,
              bytes_sent = t.sent, bytes_received = t.received, duration_ms, outcome,
              error = %error, "connection closed");
        self.finish(outcome, "", t.sent, t.received);
    }

    /// The end of a connection whose HTTP requests were decided one by one.
    pub fn closed_http(&mut self, outcome: Option<http::Outcome>) {
        let duration_ms = self.start.elapsed().as_millis() as u64;
        let Some(o) = outcome else {
            return self.closed(None);
        };
        let result = if o.error.is_some() { "error" } else { "ok" };
        tracing::info!(target: "access", conn = self.id, pod = %self.pod.name,
              direction = self.direction, src = %self.src, dst = %self.dst(), tls = self.tls,
              peer_identity = %self.peer_identity, peer_serial = %self.peer_serial,
              policy_rule = %self.policy_rule, http_requests = o.requests,
              http_denied = o.denied, duration_ms, outcome = result,
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
