//! Outbound: the listener on each pod's loopback that redirected connects land on.
//!
//! For each accepted connection the proxy looks up the original destination the kernel
//! recorded under (pod, client source address, client source port), connects to it from a
//! socket created inside the pod's network namespace (so the upstream sees the pod's own
//! address), and pumps bytes both ways.

use std::{net::SocketAddr, sync::Arc};

use agent_common::{OrigDst, SockKey};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::warn;

use super::{pump::pump, Access, Pod, Shared};
use crate::{
    authz::Verdict,
    config::{Mode, Redirect},
};

/// Handshake failures that mean "the peer does not speak our TLS" rather than "the peer's
/// identity is wrong".
const NOT_SPEAKING_TLS: &[&str] = &["peer_closed", "timeout", "not_tls", "no_alpn"];
use crate::ebpf::addr16;

fn orig_addr(orig: &OrigDst) -> SocketAddr {
    SocketAddr::new(crate::ebpf::ip_from16(orig.addr), orig.port)
}

pub(super) async fn handle(
    id: u64,
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
    shared: Arc<Shared>,
) {
    let mut log = Access::new(id, &pod, &shared.metrics, "outbound", peer);
    let dst = if pod.redirect == Redirect::Iptables {
        // The NAT table knows where the connection was going.
        match original_dst_nat(&client) {
            Ok(dst) => dst,
            Err(e) => {
                log.refused(
                    "no_original_destination",
                    "not_redirected",
                    &format!("no SO_ORIGINAL_DST (is the pod's REDIRECT rule in place?): {e}"),
                );
                return;
            }
        }
    } else {
        let key = SockKey::new(pod.id, addr16(peer.ip()), peer.port());
        let Some(orig) = shared.orig_dst.take(&key) else {
            log.refused(
                "no_original_destination",
                "not_redirected",
                &"not redirected by the kernel (a direct connect to the agent's port?)",
            );
            return;
        };
        orig_addr(&orig)
    };
    log.dst = Some(dst);
    // Egress policy: decided before any upstream connect.
    let expected = shared
        .known
        .get(&dst.ip().to_canonical())
        .map(String::as_str);
    let decision = pod.policy.current().decide_egress(dst, expected);
    log.policy_rule = decision.rule.clone();
    log.publish();
    shared.metrics.authz(
        pod.name.as_str(),
        "egress",
        decision.verdict != Verdict::Deny,
        &decision.rule,
    );
    if decision.verdict == Verdict::Deny {
        shared.count(format!("egress_deny:{}", decision.rule));
        super::reset(&client);
        log.refused(
            "denied",
            "egress_policy",
            &format!("denied by `{}`", decision.rule),
        );
        return;
    }
    if decision.audit_denied {
        shared.count(format!("egress_audit_deny:{}", decision.rule));
        warn!(pod = %pod.name, dst = %dst, rule = %decision.rule,
              "audit: this outbound connection would be denied");
    }
    // No source: the kernel picks the pod's own address. The socket is the agent's (its
    // cgroup), so the pod's connect programs leave it alone.
    let upstream = match pod.connect(None, dst, shared.connect_timeout).await {
        Ok(u) => u,
        Err(e) => {
            super::reset(&client);
            log.refused("upstream_connect_failed", "connect", &e);
            return;
        }
    };
    log.via = super::local_addr_string(&upstream);
    log.publish();
    let in_mesh = shared.in_mesh(dst.ip());
    let transfer = match (&pod.tls, in_mesh) {
        (Some(tls), true) => {
            let connector = TlsConnector::from(tls.client.clone());
            let name = ServerName::IpAddress(dst.ip().to_canonical().into());
            let started = std::time::Instant::now();
            let handshake =
                tokio::time::timeout(shared.connect_timeout, connector.connect(name, upstream));
            let err = match handshake.await {
                Ok(Ok(stream)) => {
                    shared.metrics.handshake_done("outbound", started);
                    log.tls_peer(stream.get_ref().1.peer_certificates());
                    let transfer = tokio::select! {
                        t = pump(client, stream) => Some(t),
                        _ = shared.abort.cancelled() => None,
                    };
                    return log.closed(transfer);
                }
                Ok(Err(e)) => e,
                Err(_) => {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                }
            };
            let reason = super::tls_reason(&err);
            // PERMISSIVE may fall back to plaintext when the peer simply does not speak
            // mutual TLS; a peer that spoke TLS and failed verification never gets one.
            if pod.mode == Mode::Permissive && NOT_SPEAKING_TLS.contains(&reason) {
                shared.count("outbound_downgraded_to_plaintext");
                warn!(pod = %pod.name, dst = %dst, reason,
                      "downgraded to plaintext: the mesh destination did not answer mutual TLS (PERMISSIVE)");
                match pod.connect(None, dst, shared.connect_timeout).await {
                    Ok(plain) => {
                        log.via = super::local_addr_string(&plain);
                        tokio::select! {
                            t = pump(client, plain) => Some(t),
                            _ = shared.abort.cancelled() => None,
                        }
                    }
                    Err(e) => {
                        super::reset(&client);
                        return log.refused("upstream_connect_failed", "connect", &e);
                    }
                }
            } else {
                return handshake_failed(&shared, &mut log, &client, &err);
            }
        }
        (tls, _) => {
            if in_mesh {
                // Never silent: a mesh destination reached in clear is logged and counted.
                debug_assert!(tls.is_none());
                shared.count("outbound_plaintext_to_mesh");
                warn!(pod = %pod.name, dst = %dst,
                      "plaintext to a mesh destination: the pod has no identity (set cert, key, bundle)");
            }
            tokio::select! {
                t = pump(client, upstream) => Some(t),
                _ = shared.abort.cancelled() => None,
            }
        }
    };
    log.closed(transfer);
}

/// The destination an iptables REDIRECT rewrote, from conntrack.
fn original_dst_nat(client: &TcpStream) -> std::io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let v6 = client.local_addr()?.is_ipv6();
    let addr = if v6 {
        let a = getsockopt(client, sockopt::Ip6tOriginalDst).map_err(std::io::Error::from)?;
        // sin6_port is in network byte order.
        SocketAddr::new(
            std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
            u16::from_be(a.sin6_port),
        )
    } else {
        let a = getsockopt(client, sockopt::OriginalDst).map_err(std::io::Error::from)?;
        // sin_addr and sin_port are in network byte order.
        SocketAddr::new(
            std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
            u16::from_be(a.sin_port),
        )
    };
    Ok(addr)
}

fn handshake_failed(shared: &Shared, log: &mut Access<'_>, client: &TcpStream, e: &std::io::Error) {
    let reason = super::tls_reason(e);
    shared.count(format!("outbound_handshake_failed_{reason}"));
    shared.metrics.handshake_failed("outbound", reason);
    super::reset(client);
    log.refused("tls_handshake_failed", reason, e);
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    #[test]
    fn orig_addr_families() {
        let v4 = OrigDst {
            addr: agent_common::v4_mapped([10, 0, 0, 2]),
            port: 8080,
            _pad: 0,
            pod_id: 1,
        };
        assert_eq!(orig_addr(&v4), "10.0.0.2:8080".parse().unwrap());
        let v6 = OrigDst {
            addr: "fd00::2".parse::<Ipv6Addr>().unwrap().octets(),
            port: 443,
            _pad: 0,
            pod_id: 1,
        };
        assert_eq!(orig_addr(&v6), "[fd00::2]:443".parse().unwrap());
    }
}
