//! The admin API: HTTP/1.1 on a Unix socket that only root may use (mode 0600, and the
//! peer's credentials are checked on every connection). JSON for the CLI, OpenMetrics text
//! for Prometheus.

pub mod client;

use std::{
    convert::Infallible,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::{
    ebpf::Counters,
    proxy::{Pod, Shared},
    spec::PodRequest,
    telemetry::metrics::{write_counter, write_gauge},
    types::{FailMode, LogFormat, Mode, PodId},
};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the admin API shows of a pod: derived by the enrolment code from the pod's spec
/// and what it holds for it, and replaced as a whole whenever that changes.
#[derive(Debug, Clone, Serialize)]
pub struct PodView {
    pub name: String,
    pub pod_id: Option<PodId>,
    pub netns: PathBuf,
    pub netns_cookie: Option<u64>,
    pub cgroup: PathBuf,
    /// The pod's addresses now (kept live from its namespace).
    pub addresses: Vec<IpAddr>,
    pub fail_mode: FailMode,
    pub mode: Mode,
    /// `enrolled`, `releasing`, or `blocked` (fail-closed, not served: its connections are
    /// refused until it is enrolled again).
    pub state: &'static str,
    /// Where the pod came from: `config`, `api`, or `state` (re-adopted after a restart).
    pub source: &'static str,
    pub programs: Vec<&'static str>,
    /// The Kubernetes pod (namespace, name, UID, sandbox), when a runtime enrolled it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<crate::k8s::K8sPod>,
    /// Why the pod is in this state, when that needs saying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The proxy's pod (identity and policy in force) while it is served.
    #[serde(skip)]
    pub pod: Option<Arc<Pod>>,
}

/// Why an enrolment or release request was not carried out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    /// The request itself is wrong (a field and its reason): nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// The pod is enrolled with a different spec, or is being released.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// The request was valid but the kernel or the filesystem refused a step; what had
    /// been done was undone.
    #[error("{0}")]
    Failed(String),
}

impl ControlError {
    fn status(&self) -> StatusCode {
        match self {
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The result of a successful request, as JSON for the client.
pub type ControlReply = Result<serde_json::Value, ControlError>;

/// Requests the admin API hands to the enrolment code (which owns the kernel state).
pub enum Control {
    Enroll {
        request: Box<PodRequest>,
        reply: oneshot::Sender<ControlReply>,
    },
    Release {
        name: String,
        reply: oneshot::Sender<ControlReply>,
    },
    /// A container runtime's CNI plugin: ADD, DEL or CHECK of a Kubernetes pod.
    Cni {
        request: Box<crate::cni::CniRequest>,
        reply: oneshot::Sender<ControlReply>,
    },
}

pub struct Admin {
    started: Instant,
    pub ready: AtomicBool,
    pub pods: ArcSwap<Vec<PodView>>,
    shared: Arc<Shared>,
    /// What the kernel was found to offer at start.
    features: Vec<crate::ebpf::probe::Feature>,
    /// What was loaded on it, and why the splice was not (`None`: it was).
    programs: Vec<&'static str>,
    splice_off: Option<String>,
    counters: Arc<Counters>,
    pin_root: PathBuf,
    control: mpsc::Sender<Control>,
}

impl Admin {
    pub fn new(
        shared: Arc<Shared>,
        features: Vec<crate::ebpf::probe::Feature>,
        kernel: &crate::ebpf::Kernel,
        pin_root: PathBuf,
        control: mpsc::Sender<Control>,
    ) -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            ready: AtomicBool::new(false),
            pods: ArcSwap::from_pointee(Vec::new()),
            features,
            programs: kernel.programs_loaded(),
            splice_off: kernel.splice_off.clone(),
            shared,
            counters: kernel.counters.clone(),
            pin_root,
            control,
        })
    }

    /// Hands a request to the enrolment code and waits for its answer.
    async fn control(
        &self,
        make: impl FnOnce(oneshot::Sender<ControlReply>) -> Control,
    ) -> ControlReply {
        let (tx, rx) = oneshot::channel();
        if self.control.send(make(tx)).await.is_err() {
            return Err(ControlError::Failed("the agent is stopping".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(ControlError::Failed("the agent is stopping".into())))
    }

    /// Binds the socket (root-only) and serves it until the process ends.
    pub fn serve(self: &Arc<Self>, path: &Path) -> Result<(), AdminError> {
        let err = |source| AdminError::Socket {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(err)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(err)?;
            }
        }
        // A socket left by a previous (crashed) agent.
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        info!(socket = %path.display(), "admin API listening (root only)");
        let admin = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let root = stream.peer_cred().is_ok_and(|c| c.uid() == 0);
                let admin = admin.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let admin = admin.clone();
                        async move { Ok::<_, Infallible>(admin.route(req, root).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(())
    }

    /// Also serves the read-only endpoints (health, readiness, metrics) on a loopback TCP
    /// address, for scrapers and probes that cannot use a Unix socket. Nothing else is
    /// reachable there: TCP carries no peer credentials.
    pub async fn serve_tcp(self: &Arc<Self>, addr: std::net::SocketAddr) -> Result<(), AdminError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Socket {
                path: PathBuf::from(addr.to_string()),
                source,
            })?;
        info!(addr = %addr, "admin API (health, readiness, metrics only) listening on TCP");
        let admin = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let admin = admin.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let admin = admin.clone();
                        async move {
                            let open =
                                matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics");
                            Ok::<_, Infallible>(if open && req.method() == Method::GET {
                                admin.route(req, true).await
                            } else {
                                reply(
                                    StatusCode::FORBIDDEN,
                                    &json!({"error": "only /healthz, /readyz and /metrics are served on TCP; use the Unix socket"}),
                                )
                            })
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(())
    }

    async fn route(&self, req: Request<Incoming>, root: bool) -> Response<Full<Bytes>> {
        if !root {
            warn!("admin API: refused a non-root client");
            return reply(
                StatusCode::FORBIDDEN,
                &json!({"error": "the admin API is root-only"}),
            );
        }
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let param = |k: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .map(|v| {
                    v.replace("%3A", ":")
                        .replace("%5B", "[")
                        .replace("%5D", "]")
                })
        };
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/healthz") => reply(StatusCode::OK, &json!({"status": "ok"})),
            (Method::GET, "/readyz") => {
                let ready = self.ready.load(Ordering::Relaxed);
                let code = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                reply(code, &json!({ "ready": ready }))
            }
            (Method::GET, "/status") => reply(StatusCode::OK, &self.status()),
            (Method::GET, "/pods") => reply(StatusCode::OK, &self.pods_json()),
            (Method::POST, "/pods") => {
                let request: Box<PodRequest> = match parse_body("a pod request", req).await {
                    Ok(r) => r,
                    Err(resp) => return resp,
                };
                let result = self
                    .control(|reply| Control::Enroll { request, reply })
                    .await;
                control_reply(result)
            }
            (Method::POST, "/cni") => {
                let request = match parse_body("a CNI request", req).await {
                    Ok(r) => r,
                    Err(resp) => return resp,
                };
                control_reply(self.control(|reply| Control::Cni { request, reply }).await)
            }
            (Method::DELETE, p) if p.starts_with("/pods/") => {
                let name = p["/pods/".len()..].to_string();
                let result = self.control(|reply| Control::Release { name, reply }).await;
                control_reply(result)
            }
            (Method::GET, "/conns") => {
                let pod = param("pod");
                let conns: Vec<_> = self
                    .shared
                    .metrics
                    .live()
                    .into_iter()
                    .filter(|c| pod.as_ref().is_none_or(|p| &c.pod == p))
                    .collect();
                reply(StatusCode::OK, &json!(conns))
            }
            (Method::GET, "/explain") => {
                match param("key").and_then(|k| self.shared.metrics.find(&k)) {
                    Some((c, other)) => reply(
                        StatusCode::OK,
                        &json!({ "connection": c, "other_leg": other }),
                    ),
                    None => reply(
                        StatusCode::NOT_FOUND,
                        &json!({"error": "no live or recent connection with that id or address"}),
                    ),
                }
            }
            (Method::GET, "/certs") => reply(StatusCode::OK, &self.certs()),
            (Method::GET, "/policy") => reply(StatusCode::OK, &self.policies()),
            (Method::GET, "/maps") => match crate::ebpf::dump::dump(&self.pin_root) {
                Ok(v) => reply(StatusCode::OK, &v),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, &json!({ "error": e })),
            },
            (Method::GET, "/metrics") => {
                let mut resp = Response::new(Full::new(Bytes::from(self.metrics_text())));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                resp
            }
            (Method::PUT, "/logformat") => {
                let text = body_text(req).await.to_lowercase();
                let format = match text.as_str() {
                    "json" => LogFormat::Json,
                    "human" => LogFormat::Human,
                    other => {
                        return reply(
                            StatusCode::BAD_REQUEST,
                            &json!({"error": format!("`{other}` is not a log format (json or human)")}),
                        )
                    }
                };
                match crate::telemetry::set_format(format) {
                    Ok(()) => {
                        info!(format = %text, "log format changed through the admin API");
                        reply(StatusCode::OK, &json!({ "log_format": text }))
                    }
                    Err(e) => reply(StatusCode::BAD_REQUEST, &json!({ "error": e })),
                }
            }
            (Method::PUT, "/loglevel") => {
                let filter = body_text(req).await;
                match crate::telemetry::set_level(&filter) {
                    Ok(()) => {
                        info!(filter = %filter, "log level changed through the admin API");
                        reply(StatusCode::OK, &json!({ "log_level": filter }))
                    }
                    Err(e) => reply(StatusCode::BAD_REQUEST, &json!({ "error": e })),
                }
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                &json!({"error": format!("no endpoint {path}")}),
            ),
        }
    }

    fn status(&self) -> Value {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let pods = self.pods.load();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "ready": self.ready.load(Ordering::Relaxed),
            "kernel": {
                "release": release,
                // Loaded and verified by this kernel at start, and attached through BPF
                // links. The splice's two are loaded only where the kernel runs them.
                "programs_loaded": self.programs,
                "splice": match &self.splice_off {
                    None => "available".to_string(),
                    Some(why) => format!("unavailable: {why}"),
                },
                "maps": ["hash", "lru_hash", "lpm_trie", "percpu_array", "sockmap", "sockhash", "ringbuf"],
                // Probed before loading: program types, map types, helpers per program type.
                "features": self.features,
            },
            "connections_active": self.shared.metrics.live().len(),
            "pods": pods.iter().map(|p| json!({"name": p.name, "state": p.state, "programs": p.programs})).collect::<Vec<_>>(),
        })
    }

    fn pods_json(&self) -> Value {
        let pods = self.pods.load();
        json!(pods
            .iter()
            .map(|p| {
                let mut v = json!(p);
                if let Some(pod) = &p.pod {
                    v["identity"] = json!(pod.tls.as_ref().map(|t| t
                        .store
                        .current()
                        .spiffe_id
                        .to_string()));
                    v["policy"] = json!(pod.policy.current().source);
                    v["edge"] = pod
                        .edge
                        .iter()
                        .map(|e| {
                            let cert = e.store.current();
                            json!({
                                "ports": e.ports,
                                "cert": e.store.source().0.cert,
                                "serial": cert.serial,
                                "subject": cert.subject,
                                "not_after": cert.not_after,
                                "client_auth": cert.client_auth,
                                "redirect_http": e.redirect_http,
                            })
                        })
                        .collect();
                    v["authn"] = json!(pod.authn.as_ref().map(|a| json!({
                        "ports": a.ports,
                        "subject_header": a.subject_header.as_ref().map(|h| h.as_str()),
                        "jwt": a.issuers.iter().map(|i| json!({
                            "issuer": i.issuer,
                            "audiences": i.audiences,
                            "keys": i.jwks.current().len(),
                            "jwks": i.jwks.source().path,
                        })).collect::<Vec<_>>(),
                        "basic": a.basic.as_ref().map(|b| json!({
                            "realm": b.realm,
                            "users": b.htpasswd.current().len(),
                        })),
                    })));
                    let limits = &pod.caller_limits;
                    let limiter = |l: Option<&crate::ratelimit::Limiter>| {
                        l.map(|l| {
                            json!({
                                "limit": l.spec().to_string(),
                                "keys": l.keys(),
                                "evicted": l.evicted(),
                            })
                        })
                    };
                    v["limits"] = json!({
                        "connections": limiter(limits.connections.as_ref()),
                        "requests": limiter(limits.requests.as_ref()),
                        "max_request_headers": limits.max_request_headers,
                        "max_request_bytes": limits.max_request_bytes,
                    });
                }
                v
            })
            .collect::<Vec<_>>())
    }

    fn certs(&self) -> Value {
        let pods = self.pods.load();
        let now = unix_now();
        json!(pods
            .iter()
            .filter_map(|p| {
                let store = &p.pod.as_ref()?.tls.as_ref()?.store;
                let id = store.current();
                let from = match store.source() {
                    crate::identity::IdentitySource::Files(f) => f.cert.display().to_string(),
                    crate::identity::IdentitySource::WorkloadApi(w) => w.endpoint.clone(),
                };
                Some(json!({
                    "pod": p.name,
                    "spiffe_id": id.spiffe_id.to_string(),
                    "from": from,
                    "rotations": store.reloads_ok.load(std::sync::atomic::Ordering::Relaxed),
                    "rejected": store.reloads_failed.load(std::sync::atomic::Ordering::Relaxed),
                    "serial": id.serial,
                    "issuer": id.issuer,
                    "not_after": id.not_after,
                    "expires_in_seconds": id.not_after - now,
                }))
            })
            .collect::<Vec<_>>())
    }

    fn policies(&self) -> Value {
        let pods = self.pods.load();
        json!(pods
            .iter()
            .filter_map(|p| {
                let pol = p.pod.as_ref()?.policy.current();
                Some(json!({
                    "pod": p.name,
                    "source": pol.source,
                    "default": pol.default,
                    "audit": pol.audit,
                    "rules": pol.rule_names(),
                }))
            })
            .collect::<Vec<_>>())
    }

    fn metrics_text(&self) -> String {
        let mut extra = String::new();
        let kernel: Vec<_> = self
            .counters
            .snapshot()
            .into_iter()
            .map(|(name, v)| (vec![("event", name.to_string())], v))
            .collect();
        write_counter(
            &mut extra,
            "ebpf_events",
            "Events counted in the kernel programs (per-CPU maps, summed)",
            &kernel,
        );
        let pods = self.pods.load();
        let mut reloads = Vec::new();
        let mut expiry = Vec::new();
        for pod in pods.iter().filter_map(|p| p.pod.as_ref()) {
            let name = pod.name.to_string();
            let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            let pol = &pod.policy;
            reloads.push((
                vec![
                    ("pod", name.clone()),
                    ("kind", "policy".into()),
                    ("result", "ok".into()),
                ],
                get(&pol.reloads_ok),
            ));
            reloads.push((
                vec![
                    ("pod", name.clone()),
                    ("kind", "policy".into()),
                    ("result", "rejected".into()),
                ],
                get(&pol.reloads_failed),
            ));
            if !pod.edge.is_empty() {
                // One series per pod: its edge listeners summed.
                let sum = |f: fn(&crate::tls::edge::EdgeStore) -> &std::sync::atomic::AtomicU64| {
                    pod.edge.iter().map(|e| get(f(&e.store))).sum::<u64>()
                };
                for (result, count) in [
                    ("ok", sum(|s| &s.reloads_ok)),
                    ("rejected", sum(|s| &s.reloads_failed)),
                ] {
                    reloads.push((
                        vec![
                            ("pod", name.clone()),
                            ("kind", "edge".into()),
                            ("result", result.into()),
                        ],
                        count,
                    ));
                }
            }
            if let Some(t) = &pod.tls {
                reloads.push((
                    vec![
                        ("pod", name.clone()),
                        ("kind", "identity".into()),
                        ("result", "ok".into()),
                    ],
                    get(&t.store.reloads_ok),
                ));
                reloads.push((
                    vec![
                        ("pod", name.clone()),
                        ("kind", "identity".into()),
                        ("result", "rejected".into()),
                    ],
                    get(&t.store.reloads_failed),
                ));
                let id = t.store.current();
                expiry.push((
                    vec![
                        ("pod", name.clone()),
                        ("spiffe_id", id.spiffe_id.to_string()),
                    ],
                    id.not_after,
                ));
            }
        }
        write_counter(
            &mut extra,
            "reloads",
            "Policy, identity and edge certificate reloads, by result",
            &reloads,
        );
        write_gauge(
            &mut extra,
            "certificate_expiry_timestamp_seconds",
            "When each pod's certificate expires (Unix time)",
            &expiry,
        );
        self.shared.metrics.encode(&extra)
    }
}

/// The most a request body may hold; enrolment and CNI requests are a few KiB.
const MAX_BODY: usize = 1024 * 1024;

/// A small request body as trimmed text (empty when unreadable or over [`MAX_BODY`]).
async fn body_text(req: Request<Incoming>) -> String {
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    String::from_utf8_lossy(&body).trim().to_string()
}

/// A JSON request body as `T`, or the 400 reply that says why it is not `what`.
async fn parse_body<T: serde::de::DeserializeOwned>(
    what: &str,
    req: Request<Incoming>,
) -> Result<Box<T>, Response<Full<Bytes>>> {
    parse_json(what, &body_text(req).await)
        .map_err(|e| reply(StatusCode::BAD_REQUEST, &json!({ "error": e })))
}

/// The admin API's parsing of a JSON request body (also what the fuzzer drives).
pub fn parse_json<T: serde::de::DeserializeOwned>(
    what: &str,
    body: &str,
) -> Result<Box<T>, String> {
    serde_json::from_str(body)
        .map(Box::new)
        .map_err(|e| format!("not {what}: {e}"))
}

use crate::types::unix_now;

fn control_reply(result: ControlReply) -> Response<Full<Bytes>> {
    match result {
        Ok(v) => reply(StatusCode::OK, &v),
        Err(e) => reply(e.status(), &json!({ "error": e.to_string() })),
    }
}

fn reply(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(v.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
