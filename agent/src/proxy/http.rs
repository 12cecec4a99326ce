//! Per-request authorization for HTTP/1.1 (keep-alive) and HTTP/2 (every stream), used when
//! a pod's policy has HTTP rules for a connection.
//!
//! The agent terminates HTTP (hyper, version detected from the connection preface), decides
//! each request, answers a denied one itself with 403 and a short reason (the connection
//! lives on for the next request), and forwards an allowed one to the application over its
//! own connection of the same HTTP version. The application never sees a denied request.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

use super::{
    limits::{self, RateLimited, Scope},
    Pod, Shared,
};
use crate::{
    authn::Claims,
    authz::{Caller, Request as AuthzRequest},
    identity::{CertFacts, SpiffeId},
    ratelimit::{self, KeyClass},
    telemetry::access::HttpOutcome,
    types::{ClientAddr, OrigDstAddr},
};

type Body = BoxBody<Bytes, hyper::Error>;

/// A request body on its way to the application: as it came, or cut off past the pod's
/// `max_request_bytes`.
type UpBody = Either<Incoming, Limited<Incoming>>;

/// The connection to the application, opened on the first allowed request.
enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<UpBody>),
    H2(hyper::client::conn::http2::SendRequest<UpBody>),
}

struct Ctx {
    facts: Facts,
    trust_domain: String,
    /// The `x-forwarded-client-cert` every forwarded request carries, if a certificate
    /// was presented.
    xfcc: Option<http::HeaderValue>,
    upstream: tokio::sync::Mutex<Option<Upstream>>,
    requests: AtomicU64,
    denied: AtomicU64,
    /// Requests answered 401 (no valid bearer token).
    unauthenticated: AtomicU64,
    /// Requests a rule's fault was injected into.
    faults: AtomicU64,
    /// Requests answered 429 by a rate limit.
    rate_limited: AtomicU64,
    /// The first verified token subject, for the connection's access record.
    subject: std::sync::OnceLock<String>,
}

/// What is known about an inspected connection before its first request.
pub struct Facts {
    pub id: u64,
    pub pod: Arc<Pod>,
    pub shared: Arc<Shared>,
    /// The peer's verified SPIFFE ID (None: plaintext, unauthenticated, or edge TLS).
    pub peer: Option<SpiffeId>,
    /// The certificate the caller presented and the handshake verified: a mesh peer's
    /// SVID, or an edge client's certificate.
    pub presented: Option<CertFacts>,
    /// The caller came through an edge listener: its certificate is what `client_cert`
    /// rules match.
    pub edge: bool,
    pub client: ClientAddr,
    /// The original destination (the application's address and port).
    pub dst: OrigDstAddr,
    /// Where the agent's connection to the application leaves from.
    pub app_src: SocketAddr,
}

impl Facts {
    /// The caller as rate limits count it.
    fn counted<'a>(&'a self, subject: Option<&'a str>) -> ratelimit::Caller<'a> {
        ratelimit::Caller {
            identity: self.peer.as_ref().map(SpiffeId::as_str),
            ip: self.client.ip(),
            subject,
        }
    }
}

pub async fn serve<S>(io: S, facts: Facts) -> HttpOutcome
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let by = facts
        .pod
        .tls
        .as_ref()
        .map(|t| t.store.current().spiffe_id.clone());
    let xfcc = facts
        .presented
        .as_ref()
        .and_then(|cert| http::HeaderValue::from_str(&super::xfcc::value(by.as_ref(), cert)).ok());
    let ctx = Arc::new(Ctx {
        trust_domain: facts.pod.trust_domain(),
        xfcc,
        facts,
        upstream: tokio::sync::Mutex::new(None),
        requests: AtomicU64::new(0),
        denied: AtomicU64::new(0),
        unauthenticated: AtomicU64::new(0),
        faults: AtomicU64::new(0),
        rate_limited: AtomicU64::new(0),
        subject: std::sync::OnceLock::new(),
    });
    let svc_ctx = ctx.clone();
    let service = hyper::service::service_fn(move |req| handle(svc_ctx.clone(), req));
    let settings = &ctx.facts.shared.settings;
    let builder = server(settings);
    // The idle timeout, and HTTP/2's header deadline, which hyper does not keep itself.
    let (io, watch) = super::watch::watch(io, settings.idle_timeout, settings.http_header_timeout);
    let error = tokio::select! {
        r = builder.serve_connection(TokioIo::new(io), service) => r.err().map(|e| e.to_string()),
        reason = watch.expired() => Some(reason),
    };
    HttpOutcome {
        requests: ctx.requests.load(Ordering::Relaxed),
        denied: ctx.denied.load(Ordering::Relaxed),
        unauthenticated: ctx.unauthenticated.load(Ordering::Relaxed),
        faults: ctx.faults.load(Ordering::Relaxed),
        rate_limited: ctx.rate_limited.load(Ordering::Relaxed),
        subject: ctx.subject.get().cloned().unwrap_or_default(),
        error,
    }
}

/// The HTTP server every inspected connection is served by, with its limits.
pub(crate) fn server(
    settings: &super::Settings,
) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that trickles its headers (slowloris) is closed when the timeout passes; a
    // head above the limit is answered 431 (HTTP/1) or refused by the HTTP/2 codec.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.http_header_timeout)
        .max_buf_size(settings.http_max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.http_max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// The policy's decision on one request.
pub(crate) fn decide<B>(
    policy: &crate::authz::Policy,
    caller: Caller<'_>,
    dst: OrigDstAddr,
    req: &Request<B>,
    claims: Option<&Claims>,
    trust_domain: &str,
) -> Result<crate::authz::Permit, crate::authz::Denial> {
    let headers = req.headers();
    let has_header = |name: &str, value: &str| {
        headers
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v == value))
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    policy.authorize_request(
        caller,
        dst,
        &AuthzRequest {
            method: req.method().as_str(),
            path,
            has_header: &has_header,
            claims,
        },
        trust_domain,
    )
}

async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    ctx.requests.fetch_add(1, Ordering::Relaxed);
    let policy = ctx.facts.pod.policy.current();
    let caller = Caller {
        peer: ctx.facts.peer.as_ref(),
        client: ctx.facts.client,
        client_cert: ctx.facts.presented.as_ref().filter(|_| ctx.facts.edge),
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let metrics = &ctx.facts.shared.metrics;
    let pod = &ctx.facts.pod.name;
    let caller_limits = &ctx.facts.pod.caller_limits;
    if let Some(resp) = too_large(&ctx, &req, path) {
        return Ok(resp);
    }
    // The pod's own request limit before the cost of authentication, unless it counts
    // token subjects, which authentication yields.
    let pod_limit = caller_limits.requests.as_ref();
    if let Some(l) = pod_limit.filter(|l| l.spec().key != KeyClass::JwtSub) {
        if let Err(limited) = limits::admit(l, &ctx.facts.counted(None), Scope::Pod, "requests") {
            return Ok(ctx.too_many(&limited, &req, path));
        }
    }
    // End-user authentication first: the policy may decide on the token's claims.
    let authn = ctx
        .facts
        .pod
        .authn
        .as_ref()
        .filter(|a| a.applies_to(ctx.facts.dst.port()));
    let checked = match authn {
        Some(a) => Some(a.check(req.headers(), crate::authn::now()).await),
        None => None,
    };
    let claims = match checked {
        None => None,
        Some(Ok(claims)) => Some(claims),
        Some(Err(crate::authn::Rejection::Busy)) => {
            metrics.count("basic_auth_busy");
            metrics.authn(pod.as_str(), "busy");
            let mut resp = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many password checks at once; retry\n".into(),
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
            return Ok(resp);
        }
        Some(Err(why)) => {
            ctx.unauthenticated.fetch_add(1, Ordering::Relaxed);
            metrics.count(&format!("jwt_rejected_{}", why.as_str()));
            metrics.authn(pod.as_str(), why.as_str());
            warn!(target: "access", conn = ctx.facts.id, pod = %pod, direction = "inbound",
                  kind = "http_request", src = %ctx.facts.client, dst = %ctx.facts.dst,
                  method = %req.method(), path = %path, reason = why.as_str(), status = 401,
                  "request unauthenticated");
            let what = match why {
                crate::authn::Rejection::BadCredentials => "credentials",
                _ if authn.is_some_and(|a| a.issuers.is_empty()) => "credentials",
                _ => "bearer token",
            };
            let mut resp = text(
                StatusCode::UNAUTHORIZED,
                format!("{what} {}\n", why.as_str().replace('_', " ")),
            );
            for challenge in authn
                .map(|a| a.challenges(pod.as_str(), why))
                .unwrap_or_default()
            {
                if let Ok(v) = http::HeaderValue::from_str(&challenge) {
                    resp.headers_mut().append(header::WWW_AUTHENTICATE, v);
                }
            }
            return Ok(resp);
        }
    };
    let sub = claims.as_ref().map_or("", |c| c.subject.as_str());
    if !sub.is_empty() {
        let _ = ctx.subject.set(sub.to_string());
    }
    if let Some(l) = pod_limit.filter(|l| l.spec().key == KeyClass::JwtSub) {
        if let Err(limited) =
            limits::admit(l, &ctx.facts.counted(Some(sub)), Scope::Pod, "requests")
        {
            return Ok(ctx.too_many(&limited, &req, path));
        }
    }
    let decision = decide(
        &policy,
        caller,
        ctx.facts.dst,
        &req,
        claims.as_deref(),
        &ctx.trust_domain,
    );
    let permit = match decision {
        Ok(permit) => permit,
        Err(denial) => {
            metrics.authz(pod.as_str(), "http", false, &denial.rule);
            ctx.denied.fetch_add(1, Ordering::Relaxed);
            metrics.count(&format!("authz_http_deny:{}", denial.rule));
            warn!(target: "access", conn = ctx.facts.id, pod = %pod, direction = "inbound",
                  kind = "http_request", src = %ctx.facts.client, dst = %ctx.facts.dst,
                  method = %req.method(), path = %path, sub = %sub,
                  policy_rule = %denial.rule, status = 403, "request denied");
            return Ok(text(
                StatusCode::FORBIDDEN,
                format!("denied by policy rule `{}`\n", denial.rule),
            ));
        }
    };
    metrics.authz(pod.as_str(), "http", true, &permit.rule);
    if permit.audit_denied {
        metrics.count(&format!("authz_http_audit_deny:{}", permit.rule));
        warn!(pod = %pod, src = %ctx.facts.client, method = %req.method(), path = %path,
              rule = %permit.rule, "audit: this request would be denied");
    } else {
        metrics.count(&format!("authz_http_allow:{}", permit.rule));
    }
    if let Some(l) = &permit.rate_limit {
        let rule = Scope::Rule(&permit.rule);
        if let Err(limited) = limits::admit(&l.0, &ctx.facts.counted(Some(sub)), rule, "requests") {
            return Ok(ctx.too_many(&limited, &req, path));
        }
    }
    if let Some(fault) = permit.fault.filter(|f| f.fires()) {
        // Logged and counted as injected, so a rehearsal is never mistaken for an outage.
        ctx.faults.fetch_add(1, Ordering::Relaxed);
        metrics.count(&format!("fault_injected:{}", permit.rule));
        metrics.conn_update(ctx.facts.id, |c| {
            c.fault = format!("{fault} (rule `{}`)", permit.rule)
        });
        tracing::info!(target: "access", conn = ctx.facts.id, pod = %pod, direction = "inbound",
              kind = "http_request", src = %ctx.facts.client, dst = %ctx.facts.dst,
              method = %req.method(), path = %path, policy_rule = %permit.rule,
              fault = %fault, "fault injected");
        if !fault.delay.is_zero() {
            tokio::time::sleep(fault.delay).await;
        }
        if let Some(status) = fault.abort_status {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut resp = text(
                status,
                format!("fault injected by policy rule `{}`\n", permit.rule),
            );
            resp.headers_mut()
                .insert("x-agent-fault", http::HeaderValue::from_static("abort"));
            return Ok(resp);
        }
    }
    match forward(&ctx, req, authn, claims.as_deref()).await {
        Ok(resp) => Ok(resp),
        Err(e) if cut_off(&*e) => {
            // A body without Content-Length (chunked, or HTTP/2 DATA) ran past the limit
            // on its way to the application.
            metrics.count("http_request_too_large");
            warn!(target: "access", conn = ctx.facts.id, pod = %pod, direction = "inbound",
                  kind = "http_request", src = %ctx.facts.client, dst = %ctx.facts.dst,
                  status = 413, "request body over max_request_bytes; cut off");
            Ok(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is larger than this service accepts\n".into(),
            ))
        }
        Err(e) => {
            warn!(pod = %ctx.facts.pod.name, error = %e, "cannot forward the request to the application");
            Ok(text(
                StatusCode::BAD_GATEWAY,
                "the application is unreachable\n".into(),
            ))
        }
    }
}

impl Ctx {
    /// The 429 for a request a rate limit refused: counted, logged, and telling the client
    /// when to come back.
    fn too_many<B>(&self, limited: &RateLimited, req: &Request<B>, path: &str) -> Response<Body> {
        let pod = &self.facts.pod.name;
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
        self.facts
            .shared
            .metrics
            .rate_limited(limited.labels(pod.as_str()));
        warn!(target: "access", conn = self.facts.id, pod = %pod, direction = "inbound",
              kind = "http_request", src = %self.facts.client, dst = %self.facts.dst,
              method = %req.method(), path = %path, limit = %limited.limit(),
              key = limited.spec.key.as_str(), status = 429, "request rate limited");
        let mut resp = text(StatusCode::TOO_MANY_REQUESTS, format!("{limited}\n"));
        let h = resp.headers_mut();
        h.insert(header::RETRY_AFTER, limited.why.retry_after_secs().into());
        h.insert("x-agent-rate-limited", http::HeaderValue::from_static("1"));
        resp
    }
}

/// The 431 or 413 for a request over the pod's size limits (one whose length is known
/// up front; a body that is not is cut off on its way, see [`cut_off`]).
fn too_large<B>(ctx: &Ctx, req: &Request<B>, path: &str) -> Option<Response<Body>> {
    let limits = &ctx.facts.pod.caller_limits;
    let headers = req.headers().len();
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let (status, counter, why) = match (limits.max_request_headers, limits.max_request_bytes) {
        (Some(max), _) if headers > max => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "http_too_many_headers",
            format!("{headers} header fields; this service accepts {max}"),
        ),
        (_, Some(max)) if length.is_some_and(|l| l > max) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "http_request_too_large",
            format!(
                "a body of {} bytes; this service accepts {max}",
                length.unwrap_or(0)
            ),
        ),
        _ => return None,
    };
    ctx.facts.shared.metrics.count(counter);
    warn!(target: "access", conn = ctx.facts.id, pod = %ctx.facts.pod.name,
          direction = "inbound", kind = "http_request", src = %ctx.facts.client,
          dst = %ctx.facts.dst, method = %req.method(), path = %path,
          status = status.as_u16(), reason = %why, "request over the pod's limits");
    Some(text(status, format!("{why}\n")))
}

/// Whether forwarding failed because the body ran past `max_request_bytes`.
fn cut_off(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Headers that describe one hop, not the message.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        h.remove(name);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

async fn forward(
    ctx: &Ctx,
    mut req: Request<Incoming>,
    authn: Option<&crate::authn::Authn>,
    claims: Option<&Claims>,
) -> Result<Response<Body>, Box<dyn std::error::Error + Send + Sync>> {
    strip_hop_by_hop(req.headers_mut());
    // What the client claims about certificates or users is not trusted: only what the
    // agent verified.
    let headers = req.headers_mut();
    headers.remove(super::xfcc::HEADER);
    if let Some(v) = &ctx.xfcc {
        headers.insert(super::xfcc::HEADER, v.clone());
    }
    if let Some(a) = authn {
        if let Some(name) = &a.subject_header {
            headers.remove(name);
            let subject = claims.and_then(|c| http::HeaderValue::from_str(&c.subject).ok());
            if let Some(v) = subject.filter(|v| !v.is_empty()) {
                headers.insert(name.clone(), v);
            }
        }
        if !a.forward_token {
            headers.remove(header::AUTHORIZATION);
        }
    }
    let mut req = req.map(|body| match ctx.facts.pod.caller_limits.max_request_bytes {
        Some(max) => Either::Right(Limited::new(
            body,
            usize::try_from(max).unwrap_or(usize::MAX),
        )),
        None => Either::Left(body),
    });
    let mut upstream = ctx.upstream.lock().await;
    if upstream.is_none() {
        let tcp = ctx
            .facts
            .pod
            .connect(
                Some(ctx.facts.app_src),
                ctx.facts.dst.addr(),
                ctx.facts.shared.settings.connect_timeout,
            )
            .await?;
        *upstream = Some(if req.version() == Version::HTTP_2 {
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await?;
            tokio::spawn(conn);
            Upstream::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            Upstream::H1(send)
        });
    }
    let resp = match upstream.as_mut().expect("set above") {
        Upstream::H2(send) => {
            let mut send = send.clone();
            // HTTP/2 streams run concurrently: do not hold the lock while one is in flight.
            drop(upstream);
            send.ready().await?;
            send.send_request(req).await?
        }
        Upstream::H1(send) => {
            // An HTTP/1.1 client connection serves one request at a time, in order: the
            // same order the downstream connection delivers them.
            if req.uri().scheme().is_some() {
                let pq = req
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string();
                *req.uri_mut() = pq.parse()?;
            }
            send.ready().await?;
            send.send_request(req).await?
        }
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body.boxed()))
}

/// Serves plaintext HTTP on an edge port that redirects: every request is answered with a
/// 308 to the same host and path over https (the same port speaks TLS). Returns how many
/// requests were answered.
pub async fn redirect<S>(io: S, settings: &super::Settings) -> HttpOutcome
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let answered = Arc::new(AtomicU64::new(0));
    let count = answered.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        count.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok::<_, Infallible>(to_https(&req)))
    });
    let (io, watch) = super::watch::watch(io, settings.idle_timeout, settings.http_header_timeout);
    let builder = server(settings);
    let error = tokio::select! {
        r = builder.serve_connection(TokioIo::new(io), service) => r.err().map(|e| e.to_string()),
        reason = watch.expired() => Some(reason),
    };
    HttpOutcome {
        requests: answered.load(Ordering::Relaxed),
        error,
        ..Default::default()
    }
}

/// The 308 that sends `req` to https, or a 400 when it names no host to send it to.
fn to_https<B>(req: &Request<B>) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = host
        .filter(|h| !h.is_empty() && !h.contains(['/', '@']))
        .and_then(|h| http::HeaderValue::from_str(&format!("https://{h}{pq}")).ok());
    match location {
        Some(location) => {
            let mut resp = text(
                StatusCode::PERMANENT_REDIRECT,
                "this port requires https\n".into(),
            );
            resp.headers_mut().insert(header::LOCATION, location);
            resp
        }
        None => text(
            StatusCode::BAD_REQUEST,
            "this port requires https, and the request names no host to redirect to\n".into(),
        ),
    }
}
