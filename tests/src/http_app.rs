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
}

/// The client's report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HttpSummary {
    pub statuses: Vec<u16>,
    pub bodies: Vec<String>,
    pub error: Option<String>,
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
                            let seen = SeenRequest {
                                method: req.method().to_string(),
                                path: req.uri().path().to_string(),
                                version: format!("{:?}", req.version()),
                                peer: peer.to_string(),
                                headers,
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
    h2: bool,
    headers: &[(String, String)],
) -> HttpSummary {
    let mut out = HttpSummary::default();
    if let Err(e) = run(to, requests, h2, headers, &mut out).await {
        out.error = Some(e.to_string());
    }
    out
}

async fn run(
    to: SocketAddr,
    requests: &[(String, String)],
    h2: bool,
    headers: &[(String, String)],
    out: &mut HttpSummary,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
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
        let req = req.body(Full::new(Bytes::from_static(b"request body")))?;
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
        let body = resp.into_body().collect().await?.to_bytes();
        out.bodies.push(String::from_utf8_lossy(&body).into_owned());
    }
    Ok(())
}
