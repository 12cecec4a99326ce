//! Outbound: the listener on each pod's loopback that redirected connects land on.
//!
//! For each accepted connection the proxy looks up the original destination the kernel
//! recorded under (pod, client source address, client source port), connects to it from a
//! socket created inside the pod's network namespace (so the upstream sees the pod's own
//! address), and pumps bytes both ways.

use std::{io, net::SocketAddr, sync::Arc};

use agent_common::{OrigDst, SockKey};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::warn;

use super::{Pod, Shared};
use crate::{
    ebpf::addr16,
    identity::PeerIdentity,
    pump::pump,
    telemetry::access::Access,
    types::{ClientAddr, Direction, Mode, OrigDstAddr, Redirect},
};

/// Handshake failures that mean "the peer does not speak our TLS" rather than "the peer's
/// identity is wrong".
const NOT_SPEAKING_TLS: &[&str] = &["peer_closed", "timeout", "not_tls", "no_alpn"];

fn orig_addr(orig: &OrigDst) -> OrigDstAddr {
    OrigDstAddr::new(SocketAddr::new(
        crate::ebpf::ip_from16(orig.addr),
        orig.port,
    ))
}

/// Which step of reaching the upstream failed, and why, from the connect error. A reset
/// reported by `connect()` means the TCP handshake completed and the peer then reset the
/// connection before the agent could start TLS: the connect itself did not fail.
fn connect_failure(e: &io::Error) -> (&'static str, &'static str) {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
            ("upstream_reset", "reset_after_connect")
        }
        io::ErrorKind::ConnectionRefused => ("upstream_connect_failed", "refused"),
        io::ErrorKind::TimedOut => ("upstream_connect_failed", "timeout"),
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            ("upstream_connect_failed", "unreachable")
        }
        _ => ("upstream_connect_failed", "connect"),
    }
}

/// How the kernel brought a pod's outbound connection to the agent.
fn intercepted_by(redirect: Redirect) -> &'static str {
    match redirect {
        Redirect::Ebpf => "cgroup/connect4|6 + sock_ops",
        Redirect::Iptables => "iptables REDIRECT",
    }
}

pub(super) async fn handle(
    id: u64,
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
    shared: Arc<Shared>,
) {
    let mut log = Access::new(
        id,
        &pod.name,
        &shared.metrics,
        Direction::Outbound,
        ClientAddr::new(peer),
        intercepted_by(pod.redirect),
    );
    let dst = match pod.redirect {
        // The NAT table knows where the connection was going.
        Redirect::Iptables => match original_dst_nat(&client) {
            Ok(dst) => dst,
            Err(e) => {
                super::reset(&client);
                return log.refused(
                    "no_original_destination",
                    "not_redirected",
                    &format!("no SO_ORIGINAL_DST (is the pod's REDIRECT rule in place?): {e}"),
                );
            }
        },
        Redirect::Ebpf => {
            let key = SockKey::new(pod.id.0, addr16(peer.ip()), peer.port());
            let Some(orig) = shared.orig_dst.take(&key) else {
                super::reset(&client);
                return log.refused(
                    "no_original_destination",
                    "not_redirected",
                    &"not redirected by the kernel (a direct connect to the agent's port?)",
                );
            };
            orig_addr(&orig)
        }
    };
    log.dst(dst);
    let settings = &shared.settings;
    // Egress policy: decided before any upstream connect.
    let expected = settings.known.get(&dst.ip());
    match pod.policy.current().authorize_egress(dst, expected) {
        Err(denial) => {
            log.denied("egress", &denial);
            shared
                .metrics
                .count(&format!("egress_deny:{}", denial.rule));
            super::reset(&client);
            return log.refused(
                "denied",
                "egress_policy",
                &format!("denied by `{}`", denial.rule),
            );
        }
        Ok(permit) => {
            log.permitted("egress", &permit);
            if permit.audit_denied {
                shared
                    .metrics
                    .count(&format!("egress_audit_deny:{}", permit.rule));
                warn!(pod = %pod.name, dst = %dst, rule = %permit.rule,
                      "audit: this outbound connection would be denied");
            }
        }
    }
    // No source: the kernel picks the pod's own address. The socket is the agent's (its
    // cgroup), so the pod's connect programs leave it alone.
    let upstream = match pod
        .connect(None, dst.addr(), settings.connect_timeout)
        .await
    {
        Ok(u) => u,
        Err(e) => {
            super::reset(&client);
            let (outcome, reason) = connect_failure(&e);
            return log.refused(outcome, reason, &e);
        }
    };
    log.via(upstream.local_addr().ok());
    let in_mesh = settings.in_mesh(dst.ip());
    let transfer = match (&pod.tls, in_mesh) {
        (Some(tls), true) => {
            let connector = TlsConnector::from(tls.client.clone());
            let name = ServerName::IpAddress(dst.ip().into());
            let started = std::time::Instant::now();
            let permit = match shared.admit_handshake(&pod, Direction::Outbound) {
                Ok(p) => p,
                Err(shed) => {
                    super::reset(&client);
                    return log.refused("shed", shed.reason(), &shed);
                }
            };
            let handshake = tokio::time::timeout(
                settings.handshake_timeout,
                connector.connect(name, upstream),
            )
            .await;
            // Only the handshake counts against the limit, not the connection after it.
            drop(permit);
            let err = match handshake {
                Ok(Ok(stream)) => {
                    shared.metrics.handshake_done("outbound", started);
                    let Some(peer) =
                        PeerIdentity::from_chain(stream.get_ref().1.peer_certificates())
                    else {
                        super::reset(&client);
                        return log.refused(
                            "tls_handshake_failed",
                            "no_spiffe_id",
                            &"the verified peer certificate carries no SPIFFE ID",
                        );
                    };
                    log.peer(peer, started.elapsed());
                    let transfer = tokio::select! {
                        t = pump(client, stream, shared.settings.idle_timeout) => Some(t),
                        _ = pod.life.abort.cancelled() => None,
                    };
                    return log.closed(transfer);
                }
                Ok(Err(e)) => e,
                Err(_) => io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"),
            };
            let reason = super::tls_reason(&err);
            // PERMISSIVE may fall back to plaintext when the peer simply does not speak
            // mutual TLS; a peer that spoke TLS and failed verification never gets one.
            if pod.mode == Mode::Permissive && NOT_SPEAKING_TLS.contains(&reason) {
                shared.metrics.count("outbound_downgraded_to_plaintext");
                warn!(pod = %pod.name, dst = %dst, reason,
                      "downgraded to plaintext: the mesh destination did not answer mutual TLS (PERMISSIVE)");
                match pod
                    .connect(None, dst.addr(), settings.connect_timeout)
                    .await
                {
                    Ok(plain) => {
                        log.via(plain.local_addr().ok());
                        tokio::select! {
                            t = pump(client, plain, shared.settings.idle_timeout) => Some(t),
                            _ = pod.life.abort.cancelled() => None,
                        }
                    }
                    Err(e) => {
                        super::reset(&client);
                        let (outcome, reason) = connect_failure(&e);
                        return log.refused(outcome, reason, &e);
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
                shared.metrics.count("outbound_plaintext_to_mesh");
                warn!(pod = %pod.name, dst = %dst,
                      "plaintext to a mesh destination: the pod has no identity (set cert, key, bundle)");
            }
            tokio::select! {
                t = pump(client, upstream, shared.settings.idle_timeout) => Some(t),
                _ = pod.life.abort.cancelled() => None,
            }
        }
    };
    log.closed(transfer);
}

/// The destination an iptables REDIRECT rewrote, from conntrack.
fn original_dst_nat(client: &TcpStream) -> std::io::Result<OrigDstAddr> {
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
    Ok(OrigDstAddr::new(addr))
}

fn handshake_failed(shared: &Shared, log: &mut Access<'_>, client: &TcpStream, e: &io::Error) {
    let reason = super::tls_reason(e);
    shared
        .metrics
        .count(&format!("outbound_handshake_failed_{reason}"));
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
        assert_eq!(orig_addr(&v4).to_string(), "10.0.0.2:8080");
        let v6 = OrigDst {
            addr: "fd00::2".parse::<Ipv6Addr>().unwrap().octets(),
            port: 443,
            _pad: 0,
            pod_id: 1,
        };
        assert_eq!(orig_addr(&v6).to_string(), "[fd00::2]:443");
    }
}

#[cfg(test)]
mod step_tests {
    use super::*;

    #[test]
    fn a_reset_after_connect_is_not_a_connect_failure() {
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(
            connect_failure(&reset),
            ("upstream_reset", "reset_after_connect")
        );
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            connect_failure(&refused),
            ("upstream_connect_failed", "refused")
        );
    }
}
