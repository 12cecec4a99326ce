//! Outbound: the listener on each pod's loopback that redirected connects land on.
//!
//! For each accepted connection the proxy looks up the original destination the kernel
//! recorded under (pod, client source address, client source port), connects to it from a
//! socket created inside the pod's network namespace (so the upstream sees the pod's own
//! address), and pumps bytes both ways.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use agent_common::{OrigDst, SockKey};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{info, warn};

use super::{loopback_listen_addrs, pump::pump, Pod, ProxyError, Shared};
use crate::ebpf::addr16;

/// Above the default somaxconn of older kernels, so bursts of connects are not dropped.
const BACKLOG: i32 = 4096;

/// Binds the outbound listeners inside the pod's namespace. IPv6 is skipped (with a
/// warning) only when the namespace has no IPv6 loopback at all: then no IPv6 connect can
/// happen there either.
pub fn bind(pod: &Pod, port: u16) -> Result<Vec<std::net::TcpListener>, ProxyError> {
    let mut out = Vec::new();
    for addr in loopback_listen_addrs(port) {
        match pod.netns.run(|| listen(addr))? {
            Ok(l) => out.push(l),
            Err(e)
                if addr.is_ipv6()
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
                    ) =>
            {
                warn!(pod = %pod.name, error = %e, "no IPv6 loopback in the pod: IPv6 outbound listener skipped");
            }
            Err(source) => {
                return Err(ProxyError::Listen {
                    pod: pod.name.clone(),
                    addr,
                    source,
                })
            }
        }
    }
    Ok(out)
}

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // The IPv4 listener serves IPv4-mapped destinations; keep the families apart.
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Serves one listener until `shared.stop_accepting` is cancelled.
pub async fn serve(listener: std::net::TcpListener, pod: Arc<Pod>, shared: Arc<Shared>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(pod = %pod.name, error = %e, "cannot register listener");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shared.stop_accepting.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let id = shared.next_id();
                shared
                    .tracker
                    .spawn(handle(id, stream, peer, pod.clone(), shared.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(pod = %pod.name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

fn orig_addr(orig: &OrigDst) -> SocketAddr {
    let a = orig.addr;
    let ip = if a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff {
        IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    };
    SocketAddr::new(ip, orig.port)
}

async fn connect_upstream(pod: &Pod, dst: SocketAddr, shared: &Shared) -> io::Result<TcpStream> {
    // Created inside the pod's namespace, from the agent's own cgroup: the kernel picks the
    // pod's address as source, and the pod's connect programs never see this socket.
    let sock = pod
        .netns
        .run(|| match dst {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        })
        .map_err(io::Error::other)??;
    match tokio::time::timeout(shared.connect_timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

async fn handle(id: u64, client: TcpStream, peer: SocketAddr, pod: Arc<Pod>, shared: Arc<Shared>) {
    let start = Instant::now();
    let key = SockKey::new(pod.id, addr16(peer.ip()), peer.port());
    let Some(orig) = shared.orig_dst.take(&key) else {
        warn!(target: "access", conn = id, pod = %pod.name, direction = "outbound", src = %peer,
              outcome = "no_original_destination",
              "connection refused: it was not redirected by the kernel (a direct connect to the agent's port?)");
        return;
    };
    let dst = orig_addr(&orig);
    let _ = client.set_nodelay(true);
    let upstream = match connect_upstream(&pod, dst, &shared).await {
        Ok(u) => u,
        Err(e) => {
            // Reset rather than close, so the application sees a failed connection
            // instead of an empty successful one.
            let _ = socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO));
            warn!(target: "access", conn = id, pod = %pod.name, direction = "outbound", src = %peer,
                  dst = %dst, duration_ms = start.elapsed().as_millis() as u64,
                  outcome = "upstream_connect_failed", error = %e, "connection closed");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let upstream_src = upstream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let transfer = tokio::select! {
        t = pump(client, upstream) => Some(t),
        _ = shared.abort.cancelled() => None,
    };
    let duration_ms = start.elapsed().as_millis() as u64;
    match transfer {
        Some(t) => {
            let outcome = if t.error.is_some() { "error" } else { "ok" };
            let error = t.error.map(|e| e.to_string()).unwrap_or_default();
            info!(target: "access", conn = id, pod = %pod.name, direction = "outbound", src = %peer,
                  dst = %dst, upstream_src = %upstream_src, bytes_sent = t.sent,
                  bytes_received = t.received, duration_ms, outcome, error = %error,
                  "connection closed");
        }
        None => {
            warn!(target: "access", conn = id, pod = %pod.name, direction = "outbound", src = %peer,
                  dst = %dst, upstream_src = %upstream_src, duration_ms,
                  outcome = "aborted_at_shutdown", "connection cut: drain deadline passed");
        }
    }
}

#[cfg(test)]
mod tests {
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
