//! Inbound: the listener that sk_lookup hands new connections to the pod's addresses to.
//!
//! sk_lookup keeps the packet's local address, so `getsockname()` on the accepted socket is
//! the original destination (pod address and application port). The proxy connects to the
//! application from the agent's dedicated source address (which the sk_lookup program lets
//! through instead of steering it back) and pumps bytes both ways.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use agent_common::{AGENT_APP_SRC4, AGENT_APP_SRC6};
use tokio::net::TcpStream;
use tracing::warn;

use super::{
    limits::{self, RateLimited, Scope},
    Pod, Shared,
};
use crate::{
    authz::{Caller, Inbound},
    identity::{CertFacts, PeerIdentity},
    pump::pump,
    ratelimit,
    telemetry::access::{Access, Detected},
    types::{ClientAddr, Direction, Mode, OrigDstAddr},
};

/// The address the agent's connection to the application leaves from (port chosen by the
/// kernel).
fn app_source(dst: &SocketAddr) -> SocketAddr {
    let ip = match dst {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(AGENT_APP_SRC4)),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(AGENT_APP_SRC6)),
    };
    SocketAddr::new(ip, 0)
}

/// What the first bytes of a connection said, or that none came.
enum FirstBytes {
    Seen(Detected),
    Closed,
}

/// Peeks (never consumes) until the first bytes tell what the client speaks, for at most
/// `wait`.
async fn detect(stream: &TcpStream, wait: Duration) -> FirstBytes {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => return FirstBytes::Seen(Detected::Timeout),
            Ok(Err(_)) | Ok(Ok(0)) => return FirstBytes::Closed,
            Ok(Ok(n)) => n,
        };
        match classify(&buf[..n], n < buf.len()) {
            Some(d) => return FirstBytes::Seen(d),
            None => {
                // The ClientHello is still arriving; peek returns at once while any byte
                // is queued, so wait a little before looking again.
                if tokio::time::Instant::now() >= deadline {
                    return FirstBytes::Seen(Detected::Timeout);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

/// What a connection's first bytes say: the agent's TLS (a ClientHello offering its ALPN),
/// other TLS, or anything else; `None` while a ClientHello is still arriving and `more` can come.
pub fn classify(first: &[u8], more: bool) -> Option<Detected> {
    // 0x16: a TLS handshake record.
    if first.first() != Some(&0x16) {
        return Some(Detected::Plaintext);
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = first;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) | Err(_) => return Some(Detected::Plaintext),
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let ours = accepted
                .client_hello()
                .alpn()
                .is_some_and(|mut protos| protos.any(|p| p == crate::tls::ALPN));
            Some(if ours {
                Detected::AgentTls
            } else {
                Detected::Tls
            })
        }
        Ok(None) if more => None,
        _ => Some(Detected::Plaintext),
    }
}

pub(super) async fn handle(
    id: u64,
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
    shared: Arc<Shared>,
) {
    let from = ClientAddr::new(peer);
    let mut log = Access::new(
        id,
        &pod.name,
        &shared.metrics,
        Direction::Inbound,
        from,
        "sk_lookup",
    );
    let dst = match client.local_addr() {
        Ok(a) => OrigDstAddr::new(a),
        Err(e) => {
            warn!(pod = %pod.name, error = %e, "getsockname failed on an inbound connection");
            return;
        }
    };
    log.dst(dst);
    if dst.ip().is_loopback() {
        // sk_lookup hands over connections to the pod's addresses with their original
        // local address; a loopback one dialed the listener's port directly.
        super::reset(&client);
        log.refused(
            "not_steered",
            "not_a_pod_address",
            &"not addressed to the pod",
        );
        return;
    }
    let settings = &shared.settings;
    let edge = pod.edge_port(dst.port());
    // STRICT accepts nothing but mutual TLS, and an edge port nothing but TLS, so a slow
    // ClientHello is waited for as long as a handshake may take; PERMISSIVE must also
    // serve clients that never speak first.
    let wait = match (pod.mode, edge) {
        (Mode::Strict, _) | (_, Some(_)) => settings.handshake_timeout,
        (Mode::Permissive, None) => settings.detect_timeout,
    };
    let detected = match detect(&client, wait).await {
        FirstBytes::Closed => {
            return log.refused("closed_early", "client_closed", &"closed before sending")
        }
        FirstBytes::Seen(d) => d,
    };
    log.detected(detected);
    if let (Some(edge), false) = (edge, detected == Detected::AgentTls) {
        return super::edge::serve(&mut log, client, detected, edge, from, dst, &pod, &shared)
            .await;
    }
    // Elsewhere a ClientHello without the agent's ALPN is the application's own TLS: to
    // the agent it is opaque bytes, like plaintext.
    let detected = match detected {
        Detected::Tls => Detected::Plaintext,
        d => d,
    };
    match (detected, &pod.tls, pod.mode) {
        (Detected::AgentTls, Some(tls), _) => {
            let Some((stream, started)) = super::accept_tls(
                &shared,
                &pod,
                &mut log,
                client,
                tls.server.clone(),
                "inbound",
            )
            .await
            else {
                return;
            };
            let Some(peer) = PeerIdentity::from_chain(stream.get_ref().1.peer_certificates())
            else {
                return log.refused(
                    "tls_handshake_failed",
                    "no_spiffe_id",
                    &"the verified peer certificate carries no SPIFFE ID",
                );
            };
            log.peer(peer.clone(), started.elapsed());
            forward(
                &mut log,
                stream,
                Some(peer),
                Presented::Mesh,
                from,
                dst,
                &pod,
                &shared,
            )
            .await;
        }
        (Detected::AgentTls, None, _) => {
            shared.metrics.count("inbound_tls_without_identity");
            super::reset(&client);
            log.refused(
                "refused",
                "no_identity",
                &"mutual TLS offered but the pod has no identity",
            );
        }
        (Detected::Plaintext, _, Mode::Strict) => {
            shared.metrics.count("inbound_plaintext_refused");
            super::reset(&client);
            log.refused(
                "refused",
                "plaintext_in_strict_mode",
                &"STRICT: only mutual TLS from the mesh is accepted",
            );
        }
        (Detected::Timeout, _, Mode::Strict) => {
            // Silence is not plaintext: its own reason and counter.
            shared.metrics.count("inbound_detect_timeout");
            super::reset(&client);
            log.refused(
                "refused",
                "detect_timeout",
                &format!(
                    "STRICT: no ClientHello within the handshake timeout ({} ms)",
                    settings.handshake_timeout.as_millis()
                ),
            );
        }
        (Detected::Tls, ..) => unreachable!("mapped to plaintext above"),
        (Detected::Plaintext | Detected::Timeout, _, Mode::Permissive) => {
            shared.metrics.count(if detected == Detected::Timeout {
                "inbound_detect_timeout"
            } else {
                "inbound_plaintext_accepted"
            });
            log.unauthenticated();
            forward(
                &mut log,
                client,
                None,
                Presented::None,
                from,
                dst,
                &pod,
                &shared,
            )
            .await;
        }
    }
}

/// The certificate a caller presented, as far as the HTTP path and the policy need it.
pub(super) enum Presented {
    None,
    /// A mesh peer's SVID, still in the TLS session: read only when a request needs it.
    Mesh,
    /// An edge client's certificate, if its listener asked for one.
    Edge(Option<CertFacts>),
}

/// Authorizes, connects to the application and pumps (or, for HTTP rules and edge
/// clients, decides and forwards each request).
#[allow(
    clippy::too_many_arguments,
    reason = "the connection's facts, each a distinct type"
)]
pub(super) async fn forward<S>(
    log: &mut Access<'_>,
    client: S,
    peer: Option<PeerIdentity>,
    presented: Presented,
    from: ClientAddr,
    dst: OrigDstAddr,
    pod: &Arc<Pod>,
    shared: &Arc<Shared>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + super::ClientConn + Unpin + Send + 'static,
{
    // A caller over the pod's own limit is refused before anything else is spent on it.
    let counted = ratelimit::Caller {
        identity: peer.as_ref().map(|p| p.id.as_str()),
        ip: from.ip(),
        subject: None,
    };
    let pod_limit = pod.caller_limits.connections.as_ref();
    let _pod_slot = match pod_limit
        .map(|l| limits::admit(l, &counted, Scope::Pod, "connections"))
        .transpose()
    {
        Ok(slot) => slot,
        Err(limited) => return rate_limited(log, client, pod, shared, &limited),
    };
    // Complete mediation: the policy decides before the application sees a byte.
    let policy = pod.policy.current();
    let edge_cert = match &presented {
        Presented::Edge(cert) => Some(cert.as_ref()),
        _ => None,
    };
    let caller = Caller {
        peer: peer.as_ref().map(|p| &p.id),
        client: from,
        client_cert: edge_cert.flatten(),
    };
    let decision = policy.authorize(caller, dst, &pod.trust_domain());
    let edge = edge_cert.is_some();
    let authenticated = pod
        .authn
        .as_ref()
        .is_some_and(|a| a.forces_inspection(dst.port()))
        || pod.caller_limits.forces_inspection(dst.port());
    let permit = match decision {
        Err(denial) => {
            log.denied("inbound", &denial);
            shared.metrics.count(&format!("authz_deny:{}", denial.rule));
            return log.refused("denied", "policy", &denial);
        }
        Ok(Inbound::Connection(permit)) if !edge && !authenticated => permit,
        // HTTP rules apply; or an edge client, which speaks HTTP over the agent's TLS, or an
        // authn port, whose every request needs a token: the agent serves it and decides
        // each request, whatever rule let the connection in.
        Ok(_) => {
            log.per_request();
            let presented = match presented {
                Presented::None => None,
                Presented::Mesh => client.peer_leaf().and_then(CertFacts::of),
                Presented::Edge(cert) => cert,
            };
            let serve = super::http::serve(
                client,
                super::http::Facts {
                    id: log.id(),
                    pod: pod.clone(),
                    shared: shared.clone(),
                    peer: peer.map(|p| p.id),
                    presented,
                    edge,
                    client: from,
                    dst,
                    app_src: app_source(&dst.addr()),
                },
            );
            let outcome = tokio::select! {
                o = serve => Some(o),
                _ = pod.life.abort.cancelled() => None,
            };
            return log.closed_http(outcome);
        }
    };
    let _rule_slot = match permit
        .rate_limit
        .as_ref()
        .map(|l| limits::admit(&l.0, &counted, Scope::Rule(&permit.rule), "connections"))
        .transpose()
    {
        Ok(slot) => slot,
        Err(limited) => return rate_limited(log, client, pod, shared, &limited),
    };
    log.permitted("inbound", &permit);
    if permit.audit_denied {
        shared
            .metrics
            .count(&format!("authz_audit_deny:{}", permit.rule));
        warn!(pod = %pod.name, src = %from, dst = %dst, rule = %permit.rule,
              "audit: this connection would be denied");
    } else {
        shared
            .metrics
            .count(&format!("authz_allow:{}", permit.rule));
    }
    if let Some(fault) = permit.fault.filter(|f| f.fires()) {
        shared
            .metrics
            .count(&format!("fault_injected:{}", permit.rule));
        shared.metrics.conn_update(log.id(), |c| {
            c.fault = format!("{fault} (rule `{}`)", permit.rule)
        });
        if !fault.delay.is_zero() {
            tokio::time::sleep(fault.delay).await;
        }
        if fault.reset {
            client.reset_on_close();
            drop(client);
            return log.refused(
                "fault_injected",
                "reset",
                &format!("fault injected by policy rule `{}`: {fault}", permit.rule),
            );
        }
    }
    let app = match pod
        .connect(
            Some(app_source(&dst.addr())),
            dst.addr(),
            shared.settings.connect_timeout,
        )
        .await
    {
        Ok(a) => a,
        Err(e) => return log.refused("app_connect_failed", "connect", &e),
    };
    log.via(app.local_addr().ok());
    let transfer = tokio::select! {
        t = pump(client, app, shared.settings.idle_timeout) => Some(t),
        _ = pod.life.abort.cancelled() => None,
    };
    log.closed(transfer);
}

/// Refuses a connection a rate limit does not admit: reset, counted and logged with the
/// limit that refused it.
fn rate_limited<S: super::ClientConn>(
    log: &mut Access<'_>,
    client: S,
    pod: &Pod,
    shared: &Shared,
    limited: &RateLimited,
) {
    shared
        .metrics
        .rate_limited(limited.labels(pod.name.as_str()));
    client.reset_on_close();
    drop(client);
    log.refused("rate_limited", limited.kind, limited);
}
