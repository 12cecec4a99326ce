//! Inbound: the listener that sk_lookup hands new connections to the pod's addresses to.
//!
//! sk_lookup keeps the packet's local address, so `getsockname()` on the accepted socket is
//! the original destination (pod address and application port). The proxy connects to the
//! application from the agent's dedicated source address (which the sk_lookup program lets
//! through instead of steering it back) and pumps bytes both ways.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use agent_common::{AGENT_APP_SRC4, AGENT_APP_SRC6};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::warn;

use super::{pump::pump, Access, Pod, Shared};
use crate::{
    authz::{Conn, Verdict},
    config::Mode,
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

/// What a new inbound connection turned out to be.
enum Detected {
    /// A TLS ClientHello offering the agent's ALPN: another agent.
    AgentTls,
    /// Anything else that sent bytes: plaintext, or the application's own TLS.
    Other,
    /// Nothing arrived in time (a server-speaks-first protocol, or an idle client).
    Silent,
    Closed,
}

/// Peeks (never consumes) until the first bytes tell what the client speaks.
async fn detect(stream: &TcpStream, timeout: std::time::Duration) -> Detected {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => return Detected::Silent,
            Ok(Err(_)) | Ok(Ok(0)) => return Detected::Closed,
            Ok(Ok(n)) => n,
        };
        // 0x16: a TLS handshake record.
        if buf[0] != 0x16 {
            return Detected::Other;
        }
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = &buf[..n];
        while !rd.is_empty() {
            if acceptor.read_tls(&mut rd).is_err() {
                return Detected::Other;
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let ours = accepted
                    .client_hello()
                    .alpn()
                    .is_some_and(|mut protos| protos.any(|p| p == crate::tls::ALPN));
                return if ours {
                    Detected::AgentTls
                } else {
                    Detected::Other
                };
            }
            Ok(None) if n < buf.len() => {
                // The ClientHello is still arriving; peek returns at once while any byte
                // is queued, so wait a little before looking again.
                if tokio::time::Instant::now() >= deadline {
                    return Detected::Silent;
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            _ => return Detected::Other,
        }
    }
}

pub(super) async fn handle(
    id: u64,
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
    shared: Arc<Shared>,
) {
    let mut log = Access::new(id, &pod, &shared.metrics, "inbound", peer);
    let dst = match client.local_addr() {
        Ok(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
        Err(e) => {
            warn!(pod = %pod.name, error = %e, "getsockname failed on an inbound connection");
            return;
        }
    };
    log.dst = Some(dst);
    if !pod.addrs.contains(&dst.ip()) {
        // Only sk_lookup-steered traffic has a pod address here; something dialed the
        // listener's own loopback port directly.
        log.refused(
            "not_steered",
            "not_a_pod_address",
            &"not addressed to the pod",
        );
        return;
    }
    let detected = detect(&client, shared.detect_timeout).await;
    match (detected, &pod.tls) {
        (Detected::Closed, _) => {
            log.refused("closed_early", "client_closed", &"closed before sending")
        }
        (Detected::AgentTls, Some(tls)) => {
            let started = std::time::Instant::now();
            let accept = tokio::time::timeout(
                shared.connect_timeout,
                TlsAcceptor::from(tls.server.clone()).accept(client),
            );
            let stream = match accept.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let reason = super::tls_reason(&e);
                    shared.count(format!("inbound_handshake_failed_{reason}"));
                    shared.metrics.handshake_failed("inbound", reason);
                    log.refused("tls_handshake_failed", reason, &e);
                    return;
                }
                Err(_) => {
                    shared.count("inbound_handshake_failed_timeout");
                    log.refused("tls_handshake_failed", "timeout", &"handshake timed out");
                    return;
                }
            };
            shared.metrics.handshake_done("inbound", started);
            log.tls_peer(stream.get_ref().1.peer_certificates());
            forward(&mut log, stream, &pod, &shared).await;
        }
        (Detected::AgentTls, None) => {
            shared.count("inbound_tls_without_identity");
            super::reset(&client);
            log.refused(
                "refused",
                "no_identity",
                &"mutual TLS offered but the pod has no identity",
            );
        }
        (Detected::Other | Detected::Silent, _) if pod.mode == Mode::Strict => {
            shared.count("inbound_plaintext_refused");
            super::reset(&client);
            log.refused(
                "refused",
                "plaintext_in_strict_mode",
                &"STRICT: only mutual TLS from the mesh is accepted",
            );
        }
        (Detected::Other | Detected::Silent, _) => {
            shared.count("inbound_plaintext_accepted");
            log.peer_identity = "unauthenticated".into();
            forward(&mut log, client, &pod, &shared).await;
        }
    }
}

/// Connects to the application and pumps.
async fn forward<S>(log: &mut Access<'_>, client: S, pod: &Arc<Pod>, shared: &Arc<Shared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let dst = log.dst.expect("set before forwarding");
    // Complete mediation: the policy decides before the application sees a byte.
    let identity = (log.tls == "mtls").then(|| log.peer_identity.clone());
    let conn = Conn {
        identity: identity.as_deref(),
        src: log.src.ip(),
        port: dst.port(),
    };
    let policy = pod.policy.current();
    let decision = policy.decide_l4(&conn, &pod.trust_domain());
    log.policy_rule = decision.rule.clone();
    log.publish();
    if decision.verdict != Verdict::InspectHttp {
        shared.metrics.authz(
            pod.name.as_str(),
            "inbound",
            decision.verdict == Verdict::Allow,
            &decision.rule,
        );
    }
    match decision.verdict {
        Verdict::Deny => {
            shared.count(format!("authz_deny:{}", decision.rule));
            log.refused(
                "denied",
                "policy",
                &format!("denied by `{}` ({})", decision.rule, policy.source),
            );
            return;
        }
        Verdict::InspectHttp => {
            log.policy_rule = "(per HTTP request)".into();
            let serve = super::http::serve(
                client,
                super::http::Facts {
                    id: log.id,
                    pod: pod.clone(),
                    shared: shared.clone(),
                    identity,
                    src: log.src,
                    dst,
                    app_src: app_source(&dst),
                },
            );
            let outcome = tokio::select! {
                o = serve => Some(o),
                _ = shared.abort.cancelled() => None,
            };
            log.closed_http(outcome);
            return;
        }
        Verdict::Allow => {
            if decision.audit_denied {
                shared.count(format!("authz_audit_deny:{}", decision.rule));
                warn!(pod = %pod.name, src = %log.src, dst = %dst, rule = %decision.rule,
                      "audit: this connection would be denied");
            } else {
                shared.count(format!("authz_allow:{}", decision.rule));
            }
        }
    }
    let app = match pod
        .connect(Some(app_source(&dst)), dst, shared.connect_timeout)
        .await
    {
        Ok(a) => a,
        Err(e) => {
            log.refused("app_connect_failed", "connect", &e);
            return;
        }
    };
    log.via = super::local_addr_string(&app);
    log.publish();
    let transfer = tokio::select! {
        t = pump(client, app) => Some(t),
        _ = shared.abort.cancelled() => None,
    };
    log.closed(transfer);
}
