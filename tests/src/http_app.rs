//! The HTTP side of the test application (`podapp serve-http` / `podapp http-client`):
//! a plain hyper server that records every request it receives, and a client that sends a
//! list of requests over ONE connection (HTTP/1.1 keep-alive, or HTTP/2 streams).

use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};

/// One request as the server application saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub version: String,
    pub peer: String,
    /// Every header, by lower-case name (repeated ones joined by `, `).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// The length of the body it read.
    #[serde(default)]
    pub body_bytes: usize,
}

/// The client's report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HttpSummary {
    pub statuses: Vec<u16>,
    pub bodies: Vec<String>,
    /// Each response's `Retry-After` ("" without one).
    #[serde(default)]
    pub retry_after: Vec<String>,
    /// From the first request sent to the last response read.
    #[serde(default)]
    pub elapsed_ms: u64,
    pub error: Option<String>,
}

/// How `client` sends its requests.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    pub h2: bool,
    /// Added to every request ("name", "value").
    pub headers: Vec<(String, String)>,
    /// One request started every this long (a steady offered rate), instead of each as
    /// soon as the last one is answered.
    pub interval: Option<std::time::Duration>,
    /// The body's length (default: the 12 bytes `request body`).
    pub body_bytes: Option<usize>,
}

pub async fn serve(addrs: Vec<SocketAddr>) {
    let mut tasks = Vec::new();
    for addr in addrs {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((s, peer)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<Incoming>| async move {
                            let mut headers = std::collections::BTreeMap::<String, String>::new();
                            for (name, value) in req.headers() {
                                let value = String::from_utf8_lossy(value.as_bytes());
                                headers
                                    .entry(name.to_string())
                                    .and_modify(|v| *v = format!("{v}, {value}"))
                                    .or_insert_with(|| value.into_owned());
                            }
                            let (parts, body) = req.into_parts();
                            // Read whole before it is recorded and answered: a request whose
                            // body did not arrive complete is not one the app saw.
                            let Ok(body) = body.collect().await else {
                                return Ok(Response::builder()
                                    .status(400)
                                    .body(Full::new(Bytes::from_static(b"incomplete body\n")))
                                    .expect("a static response"));
                            };
                            let seen = SeenRequest {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_string(),
                                version: format!("{:?}", parts.version),
                                peer: peer.to_string(),
                                headers,
                                body_bytes: body.to_bytes().len(),
                            };
                            println!("{}", serde_json::to_string(&seen).unwrap_or_default());
                            let body = format!("hello {} {}\n", seen.method, seen.path);
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        }));
    }
    println!("listening");
    for t in tasks {
        let _ = t.await;
    }
}

/// Sends `requests` ("METHOD /path") in order over one connection, each with `headers`.
pub async fn client(
    to: SocketAddr,
    requests: &[(String, String)],
    o: &ClientOptions,
) -> HttpSummary {
    let mut out = HttpSummary::default();
    let start = std::time::Instant::now();
    if let Err(e) = run(to, requests, o, &mut out).await {
        out.error = Some(e.to_string());
    }
    out.elapsed_ms = start.elapsed().as_millis() as u64;
    out
}

async fn run(
    to: SocketAddr,
    requests: &[(String, String)],
    o: &ClientOptions,
    out: &mut HttpSummary,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (h2, headers) = (o.h2, &o.headers);
    let body = match o.body_bytes {
        Some(n) => Bytes::from(vec![b'x'; n]),
        None => Bytes::from_static(b"request body"),
    };
    let mut pace = o.interval.map(|every| {
        let mut t = tokio::time::interval(every);
        // Behind schedule (a slow answer), the next request goes when it can, not in a
        // catch-up burst.
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let tcp = tokio::net::TcpStream::connect(to).await?;
    let io = TokioIo::new(tcp);
    enum Sender {
        H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
        H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
    }
    let mut sender = if h2 {
        let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(c);
        Sender::H2(s)
    } else {
        let (s, c) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(c);
        Sender::H1(s)
    };
    for (method, path) in requests {
        if let Some(p) = &mut pace {
            p.tick().await;
        }
        let uri = if h2 {
            format!("http://{to}{path}")
        } else {
            path.clone()
        };
        let mut req = Request::builder()
            .method(method.as_str())
            .uri(uri)
            .header("host", to.to_string());
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(Full::new(body.clone()))?;
        let resp = match &mut sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        out.statuses.push(resp.status().as_u16());
        out.retry_after.push(
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        );
        let body = resp.into_body().collect().await?.to_bytes();
        out.bodies.push(String::from_utf8_lossy(&body).into_owned());
    }
    Ok(())
}
