//! Inbound: the listener that sk_lookup hands new connections to the pod's addresses to.
//!
//! sk_lookup keeps the packet's local address, so `getsockname()` on the accepted socket is
//! the original destination (pod address and application port). The proxy connects to the
//! application from the agent's dedicated source address (which the sk_lookup program lets
//! through instead of steering it back) and pumps bytes both ways.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use agent_common::{AGENT_APP_SRC4, AGENT_APP_SRC6};
use tokio::net::TcpStream;
use tracing::warn;

use super::{pump::pump, Pod, Shared};

/// The address the agent's connection to the application leaves from (port chosen by the
/// kernel).
fn app_source(dst: &SocketAddr) -> SocketAddr {
    let ip = match dst {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(AGENT_APP_SRC4)),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(AGENT_APP_SRC6)),
    };
    SocketAddr::new(ip, 0)
}

pub(super) async fn handle(
    id: u64,
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
    shared: Arc<Shared>,
) {
    let start = Instant::now();
    let dst = match client.local_addr() {
        Ok(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
        Err(e) => {
            warn!(pod = %pod.name, error = %e, "getsockname failed on an inbound connection");
            return;
        }
    };
    if !pod.addrs.contains(&dst.ip()) {
        // Only sk_lookup-steered traffic has a pod address here; something dialed the
        // listener's own loopback port directly.
        warn!(target: "access", conn = id, pod = %pod.name, direction = "inbound", src = %peer,
              dst = %dst, outcome = "not_steered", "connection refused: not addressed to the pod");
        return;
    }
    let app = match pod
        .connect(Some(app_source(&dst)), dst, shared.connect_timeout)
        .await
    {
        Ok(a) => a,
        Err(e) => {
            super::reset(&client);
            warn!(target: "access", conn = id, pod = %pod.name, direction = "inbound", src = %peer,
                  dst = %dst, duration_ms = start.elapsed().as_millis() as u64,
                  outcome = "app_connect_failed", error = %e, "connection closed");
            return;
        }
    };
    let app_src = super::local_addr_string(&app);
    let transfer = tokio::select! {
        t = pump(client, app) => Some(t),
        _ = shared.abort.cancelled() => None,
    };
    super::log_close(id, &pod, "inbound", peer, dst, &app_src, start, transfer);
}
