//! The userspace proxy: listeners inside each pod's network namespace, and per connection
//! accept → original destination → detect → TLS → authorize → connect → pump.
//!
//! Each step yields a typed fact that the next one takes: accept gives the client address
//! and the [`OrigDstAddr`], the handshake a [`crate::identity::PeerIdentity`], the policy a
//! [`crate::authz::Permit`] or [`crate::authz::Denial`] naming its rule. The access record
//! (`telemetry::access`) is handed the same values; nothing is read back from it.

pub mod edge;
pub(crate) mod http;
pub mod inbound;
pub mod limits;
pub mod outbound;
pub(crate) mod watch;
pub(crate) mod xfcc;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::warn;

use crate::{
    authz::PolicyStore,
    ebpf::OrigDstTable,
    identity::{IdentityStore, SpiffeId},
    netns::Netns,
    telemetry::metrics::Metrics,
    types::{Direction, Mode, PodId, PodName, Redirect},
};

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

/// Above the default somaxconn of older kernels, so bursts of connects are not dropped.
const BACKLOG: i32 = 4096;

/// The node-wide settings every connection is handled with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connect_timeout: Duration,
    /// How long a mutual TLS handshake may take (and how long a STRICT pod waits for a
    /// ClientHello).
    pub handshake_timeout: Duration,
    /// How long a PERMISSIVE pod's inbound waits for a client's first bytes.
    pub detect_timeout: Duration,
    /// How long an inspected HTTP/1 client may take to send a request's headers.
    pub http_header_timeout: Duration,
    /// The largest HTTP request head (HTTP/1) or header list (HTTP/2) accepted.
    pub http_max_header_bytes: usize,
    /// Destinations here must answer mutual TLS.
    pub mesh_networks: Vec<ipnet::IpNet>,
    /// Known workloads' addresses (canonical) and identities: in the mesh wherever they are.
    pub known: HashMap<IpAddr, SpiffeId>,
    /// Open connections and handshakes in flight, per pod and for the node.
    pub limits: limits::LimitSettings,
    /// A proxied connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
}

impl Settings {
    pub fn in_mesh(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.known.contains_key(&ip) || self.mesh_networks.iter().any(|n| n.contains(&ip))
    }
}

/// State shared by every connection task of every pod.
pub struct Shared {
    pub orig_dst: OrigDstTable,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    /// The node's share of [`Settings::limits`].
    pub limits: limits::Limits,
    next_conn_id: AtomicU64,
}

impl Shared {
    pub fn new(orig_dst: OrigDstTable, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            orig_dst,
            limits: limits::Limits::for_node(&settings.limits),
            settings,
            metrics: Arc::new(Metrics::new()),
            next_conn_id: AtomicU64::new(1),
        })
    }

    pub fn next_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A handshake slot for `pod`, or the shed (already counted and logged) that refuses it.
    pub fn admit_handshake(
        &self,
        pod: &Pod,
        direction: Direction,
    ) -> Result<limits::Permit, limits::Shed> {
        limits::handshake(&pod.limits, &self.limits).inspect_err(|shed| {
            self.shed(pod, direction, *shed);
        })
    }

    /// Counts a shed connection of `pod` and logs it (once a second per pod at most: an
    /// overload must not also flood the log).
    pub fn shed(&self, pod: &Pod, direction: Direction, shed: limits::Shed) {
        let dir = direction.as_str();
        self.metrics.shed(pod.name.as_str(), dir, shed.reason());
        self.metrics.count(&format!("{dir}_shed_{}", shed.reason()));
        if pod.limits.should_warn() {
            warn!(pod = %pod.name, direction = dir, reason = shed.reason(), "{shed}");
        }
    }
}

/// One pod's connections from first accept to the last byte: releasing the pod stops its
/// accept loops, waits for its connections and, past the deadline, cuts them, without
/// touching any other pod.
#[derive(Debug, Default)]
pub struct Lifecycle {
    /// Cancelled first: the pod's listeners stop accepting (and close).
    pub stop_accepting: CancellationToken,
    /// Cancelled when the drain deadline passes: open connections are cut.
    pub abort: CancellationToken,
    /// Every connection task of the pod.
    pub tracker: TaskTracker,
}

impl Lifecycle {
    /// Stops accepting, waits up to `deadline` for open connections, then cuts the rest.
    /// Returns (connections at the start, connections cut).
    pub async fn drain(&self, deadline: Duration) -> (usize, usize) {
        self.stop_accepting.cancel();
        self.tracker.close();
        let open = self.tracker.len();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            return (open, 0);
        }
        let cut = self.tracker.len();
        self.abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        (open, cut)
    }
}

/// An enrolled pod as the proxy sees it.
#[derive(Debug)]
pub struct Pod {
    pub name: PodName,
    pub id: PodId,
    pub netns: Netns,
    pub mode: Mode,
    /// Present when the pod has an identity: it then speaks mutual TLS with the mesh.
    pub tls: Option<PodTls>,
    pub policy: Arc<PolicyStore>,
    /// Ports where clients outside the mesh get TLS from the agent.
    pub edge: Vec<edge::EdgePort>,
    /// End-user authentication of the pod's HTTP requests.
    pub authn: Option<crate::authn::Authn>,
    /// How outbound connections reach the agent (and so where their destination is read).
    pub redirect: Redirect,
    /// SO_MARK for upstream sockets, so an iptables REDIRECT in the pod lets them pass.
    pub upstream_mark: Option<u32>,
    pub life: Lifecycle,
    /// The pod's share of [`Settings::limits`].
    pub limits: limits::Limits,
    /// What one caller may ask of the pod (`[pod.limits]`).
    pub caller_limits: limits::CallerLimits,
}

impl Pod {
    /// The pod's own trust domain ("" without an identity).
    pub fn trust_domain(&self) -> String {
        self.tls
            .as_ref()
            .map(|t| t.store.current().spiffe_id.trust_domain().to_string())
            .unwrap_or_default()
    }
}

/// A pod's identity and the rustls configurations built on it (which read the identity
/// anew for every handshake, so rotation needs no rebuild).
pub struct PodTls {
    pub store: Arc<IdentityStore>,
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for PodTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodTls")
            .field("store", &self.store)
            .finish()
    }
}

impl Pod {
    /// The pod's listeners on `127.0.0.1:port` and `[::1]:port`: each one `inherited`
    /// gives (a socket a previous agent handed over), else bound now inside the pod's
    /// namespace. IPv6 is skipped (with a warning) only when the namespace has no IPv6
    /// loopback at all: then no IPv6 connection can happen there either.
    pub fn listeners(
        &self,
        port: u16,
        inherited: &mut dyn FnMut(SocketAddr) -> Option<std::net::TcpListener>,
    ) -> Result<Vec<std::net::TcpListener>, ProxyError> {
        let mut out = Vec::new();
        for addr in loopback_listen_addrs(port) {
            if let Some(l) = inherited(addr) {
                out.push(l);
                continue;
            }
            match self.netns.run(|| listen(addr))? {
                Ok(l) => out.push(l),
                Err(e)
                    if addr.is_ipv6()
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
                        ) =>
                {
                    warn!(pod = %self.name, port, error = %e, "no IPv6 loopback in the pod: IPv6 listener skipped");
                }
                Err(source) => {
                    return Err(ProxyError::Listen {
                        pod: self.name.clone(),
                        addr,
                        source,
                    })
                }
            }
        }
        Ok(out)
    }

    /// Connects to `dst` from a socket created inside the pod's namespace (optionally
    /// bound to `src` first), so it leaves from the pod's own address.
    pub async fn connect(
        &self,
        src: Option<SocketAddr>,
        dst: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let sock = self
            .netns
            .run(|| -> io::Result<TcpSocket> {
                let sock = match dst {
                    SocketAddr::V4(_) => TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => TcpSocket::new_v6()?,
                };
                if let Some(src) = src {
                    sock.bind(src)?;
                }
                if let Some(mark) = self.upstream_mark {
                    socket2::SockRef::from(&sock).set_mark(mark)?;
                }
                Ok(sock)
            })
            .map_err(io::Error::other)??;
        let stream = match tokio::time::timeout(timeout, sock.connect(dst)).await {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // The IPv4 listener serves IPv4 (and IPv4-mapped) traffic; keep the families apart.
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Accepts on one listener until the pod stops accepting, handing each connection to its
/// direction's handler as a task of the pod. The listener closes when this returns.
pub async fn serve(
    listener: std::net::TcpListener,
    direction: Direction,
    pod: Arc<Pod>,
    shared: Arc<Shared>,
) {
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
            _ = pod.life.stop_accepting.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let permit = match limits::connection(&pod.limits, &shared.limits) {
                    Ok(p) => p,
                    Err(shed) => {
                        shared.shed(&pod, direction, shed);
                        reset(&stream);
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let id = shared.next_id();
                let (pod2, shared2) = (pod.clone(), shared.clone());
                pod.life.tracker.spawn(async move {
                    // Held until the connection ends.
                    let _permit = permit;
                    match direction {
                        Direction::Outbound => {
                            outbound::handle(id, stream, peer, pod2, shared2).await
                        }
                        Direction::Inbound => {
                            inbound::handle(id, stream, peer, pod2, shared2).await
                        }
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(pod = %pod.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The loopback addresses the outbound listeners use in every pod.
pub fn loopback_listen_addrs(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
    ]
}

/// Reset rather than close, so the peer sees a failed connection instead of an empty
/// successful one.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// An accepted client connection, plain or under the agent's TLS.
pub(crate) trait ClientConn {
    /// Makes the close that follows a reset.
    fn reset_on_close(&self);
    /// The certificate the client presented in the handshake, if any.
    fn peer_leaf(&self) -> Option<&[u8]>;
}

impl ClientConn for TcpStream {
    fn reset_on_close(&self) {
        reset(self)
    }

    fn peer_leaf(&self) -> Option<&[u8]> {
        None
    }
}

impl ClientConn for tokio_rustls::server::TlsStream<TcpStream> {
    fn reset_on_close(&self) {
        reset(self.get_ref().0)
    }

    fn peer_leaf(&self) -> Option<&[u8]> {
        let leaf = self.get_ref().1.peer_certificates()?.first()?;
        Some(leaf.as_ref())
    }
}

/// A server handshake on `client` with `config`: under the handshake limits (only the
/// handshake counts against them, not the connection after it) and the handshake timeout.
/// A failure is counted (`{kind}_handshake_failed_{reason}`, and by `kind` in the
/// handshake metrics) and ends the record; `None` then. `kind` is `inbound` (mesh) or
/// `edge`.
pub(crate) async fn accept_tls(
    shared: &Shared,
    pod: &Pod,
    log: &mut crate::telemetry::access::Access<'_>,
    client: TcpStream,
    config: Arc<rustls::ServerConfig>,
    kind: &'static str,
) -> Option<(
    tokio_rustls::server::TlsStream<TcpStream>,
    std::time::Instant,
)> {
    let permit = match shared.admit_handshake(pod, Direction::Inbound) {
        Ok(p) => p,
        Err(shed) => {
            reset(&client);
            log.refused("shed", shed.reason(), &shed);
            return None;
        }
    };
    let started = std::time::Instant::now();
    let accept = tokio::time::timeout(
        shared.settings.handshake_timeout,
        tokio_rustls::TlsAcceptor::from(config).accept(client),
    )
    .await;
    drop(permit);
    let (reason, error): (&str, Box<dyn std::fmt::Display>) = match accept {
        Ok(Ok(stream)) => {
            shared.metrics.handshake_done(kind, started);
            return Some((stream, started));
        }
        Ok(Err(e)) => (tls_reason(&e), Box::new(e)),
        Err(_) => ("timeout", Box::new("handshake timed out")),
    };
    shared
        .metrics
        .count(&format!("{kind}_handshake_failed_{reason}"));
    shared.metrics.handshake_failed(kind, reason);
    log.refused("tls_handshake_failed", reason, &error);
    None
}

/// The rustls error inside an I/O error from tokio-rustls, as a short reason.
pub(crate) fn tls_reason(e: &io::Error) -> &'static str {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(crate::tls::reason)
        .unwrap_or(match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => "peer_closed",
            io::ErrorKind::TimedOut => "timeout",
            _ => "handshake_failed",
        })
}
