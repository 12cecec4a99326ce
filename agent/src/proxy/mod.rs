//! The userspace proxy: listeners inside each pod's network namespace and the byte pumps.

pub mod outbound;
mod pump;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{config::PodName, ebpf::OrigDstTable, netns::Netns};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("pod {pod}: cannot listen on {addr} inside the pod's network namespace: {source} (is another proxy using the port? set outbound_port)")]
    Listen {
        pod: PodName,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
}

/// An enrolled pod as the proxy sees it.
#[derive(Debug)]
pub struct Pod {
    pub name: PodName,
    pub id: u32,
    pub netns: Netns,
}

/// State shared by every connection task.
pub struct Shared {
    pub orig_dst: OrigDstTable,
    pub connect_timeout: Duration,
    /// Cancelled on SIGTERM: listeners stop accepting.
    pub stop_accepting: CancellationToken,
    /// Cancelled when the drain deadline passes: open connections are cut.
    pub abort: CancellationToken,
    pub tracker: TaskTracker,
    next_conn_id: AtomicU64,
}

impl Shared {
    pub fn new(orig_dst: OrigDstTable, connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            orig_dst,
            connect_timeout,
            stop_accepting: CancellationToken::new(),
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
            next_conn_id: AtomicU64::new(1),
        })
    }

    pub fn next_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// The loopback addresses the outbound listeners use in every pod.
pub fn loopback_listen_addrs(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
    ]
}
