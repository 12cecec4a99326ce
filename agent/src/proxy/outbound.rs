//! Outbound: the listener on each pod's loopback that redirected connects land on.
//!
//! For each accepted connection the proxy looks up the original destination the kernel
//! recorded under (pod, client source address, client source port), connects to it from a
//! socket created inside the pod's network namespace (so the upstream sees the pod's own
//! address), and pumps bytes both ways.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use agent_common::{OrigDst, SockKey};
use tokio::net::TcpStream;
use tracing::warn;

use super::{pump::pump, Pod, Shared};
use crate::ebpf::addr16;

fn orig_addr(orig: &OrigDst) -> SocketAddr {
    let a = orig.addr;
    let ip = if a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff {
        IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    };
    SocketAddr::new(ip, orig.port)
}

pub(super) async fn handle(
    id: u64,
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
    shared: Arc<Shared>,
) {
    let start = Instant::now();
    let key = SockKey::new(pod.id, addr16(peer.ip()), peer.port());
    let Some(orig) = shared.orig_dst.take(&key) else {
        warn!(target: "access", conn = id, pod = %pod.name, direction = "outbound", src = %peer,
              outcome = "no_original_destination",
              "connection refused: it was not redirected by the kernel (a direct connect to the agent's port?)");
        return;
    };
    let dst = orig_addr(&orig);
    // No source: the kernel picks the pod's own address. The socket is the agent's (its
    // cgroup), so the pod's connect programs leave it alone.
    let upstream = match pod.connect(None, dst, shared.connect_timeout).await {
        Ok(u) => u,
        Err(e) => {
            super::reset(&client);
            warn!(target: "access", conn = id, pod = %pod.name, direction = "outbound", src = %peer,
                  dst = %dst, duration_ms = start.elapsed().as_millis() as u64,
                  outcome = "upstream_connect_failed", error = %e, "connection closed");
            return;
        }
    };
    let upstream_src = super::local_addr_string(&upstream);
    let transfer = tokio::select! {
        t = pump(client, upstream) => Some(t),
        _ = shared.abort.cancelled() => None,
    };
    super::log_close(
        id,
        &pod,
        "outbound",
        peer,
        dst,
        &upstream_src,
        start,
        transfer,
    );
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
