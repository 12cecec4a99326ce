//! Edge ports: TLS for clients outside the mesh, on the same port the mesh reaches with
//! mutual TLS. Inbound tells the two apart by the ClientHello (the agent's ALPN) and hands
//! everything else on an edge port here: a ClientHello gets the edge certificate, then its
//! HTTP requests are decided by the pod's policy like any inspected request; plaintext is
//! refused, or answered with a 308 to https when the listener says `redirect_http`.

use std::sync::Arc;

use tokio::net::TcpStream;

use super::{inbound::Presented, Pod, Shared};
use crate::{
    identity::CertFacts,
    telemetry::access::{Access, Detected, EdgeTls},
    tls::edge::EdgeStore,
    types::{ClientAddr, OrigDstAddr},
};

/// One `[[pod.edge]]` listener as the proxy serves it.
#[derive(Debug)]
pub struct EdgePort {
    pub ports: Vec<u16>,
    pub store: Arc<EdgeStore>,
    pub redirect_http: bool,
}

impl Pod {
    /// The edge listener serving `port`, if it is an edge port.
    pub fn edge_port(&self, port: u16) -> Option<&EdgePort> {
        self.edge.iter().find(|e| e.ports.contains(&port))
    }
}

/// A connection to an edge port whose first bytes are not the agent's mutual TLS.
#[allow(
    clippy::too_many_arguments,
    reason = "the connection's facts, each a distinct type"
)]
pub(super) async fn serve(
    log: &mut Access<'_>,
    client: TcpStream,
    detected: Detected,
    edge: &EdgePort,
    from: ClientAddr,
    dst: OrigDstAddr,
    pod: &Arc<Pod>,
    shared: &Arc<Shared>,
) {
    let metrics = &shared.metrics;
    if detected != Detected::Tls {
        if !edge.redirect_http || detected == Detected::Timeout {
            metrics.count("edge_plaintext_refused");
            super::reset(&client);
            return log.refused(
                "refused",
                "plaintext_on_edge_port",
                &format!("port {} is an edge port: it speaks TLS only", dst.port()),
            );
        }
        metrics.count("edge_http_redirected");
        log.per_request();
        let outcome = tokio::select! {
            o = super::http::redirect(client, &shared.settings) => Some(o),
            _ = pod.life.abort.cancelled() => None,
        };
        return log.closed_http(outcome);
    }
    let config = edge.store.current().server.clone();
    let Some((stream, started)) = super::accept_tls(shared, pod, log, client, config, "edge").await
    else {
        return;
    };
    let session = stream.get_ref().1;
    let client_cert = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| CertFacts::of(leaf));
    let alpn = session
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    log.edge(
        EdgeTls {
            alpn,
            client_cert: client_cert.clone(),
        },
        started.elapsed(),
    );
    metrics.count("edge_tls_accepted");
    super::inbound::forward(
        log,
        stream,
        None,
        Presented::Edge(client_cert),
        from,
        dst,
        pod,
        shared,
    )
    .await;
}
