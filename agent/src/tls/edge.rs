//! Edge TLS: the server side a pod's `[[pod.edge]]` ports present to clients outside the
//! mesh. A certificate from files (cert-manager's `tls.crt`/`tls.key`), TLS 1.2 and 1.3,
//! ALPN h2 and http/1.1, and optionally a client certificate required and verified against
//! a CA of the pod's own choosing (not the mesh's). The rustls configuration is rebuilt on
//! every reload, so a renewed certificate or a changed client CA applies to the next
//! handshake; a bad reload keeps the previous one serving (`store`).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{server::WebPkiClientVerifier, RootCertStore, ServerConfig};
use tracing::{info, warn};

use crate::pem::{self, PemError};
use crate::{
    identity::serial_of,
    store::{Source, Store},
    types::PodName,
};

/// The ALPN protocols an edge listener offers, preferred first.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Where an edge listener's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EdgeFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("{0} (an edge listener needs its certificate chain and key in PEM: `cert` and `key`, or `dir` holding tls.crt and tls.key as cert-manager writes them)")]
    Certificate(PemError),
    #[error("client_ca {0}")]
    ClientCa(PemError),
    #[error("client_ca {path}: {reason}")]
    Verifier { path: PathBuf, reason: String },
}

/// A loaded edge certificate and the configuration built on it.
pub struct Edge {
    pub server: Arc<ServerConfig>,
    pub serial: String,
    pub subject: String,
    pub not_after: i64,
    /// Client certificates are required (a `client_ca` is configured).
    pub client_auth: bool,
}

impl Edge {
    pub fn load(files: &EdgeFiles) -> Result<Self, EdgeError> {
        let chain = pem::certs(&files.cert, "is this a PEM certificate file?")
            .map_err(EdgeError::Certificate)?;
        let key = pem::key(&files.key).map_err(EdgeError::Certificate)?;
        let (serial, subject, not_after) = match x509_parser::parse_x509_certificate(&chain[0]) {
            Ok((_, leaf)) => (
                serial_of(&chain[0]),
                leaf.subject().to_string(),
                leaf.validity().not_after.timestamp(),
            ),
            Err(e) => {
                return Err(EdgeError::Certificate(PemError::Invalid {
                    path: files.cert.clone(),
                    reason: format!("not a certificate: {e}"),
                }))
            }
        };
        let certified =
            pem::certified(chain, key, &files.cert, &files.key).map_err(EdgeError::Certificate)?;
        pem::warn_if_key_readable(&files.key);
        let builder = ServerConfig::builder_with_provider(crate::crypto::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3");
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let roots = RootCertStore {
                    roots: pem::anchors(path).map_err(EdgeError::ClientCa)?,
                };
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    crate::crypto::provider(),
                )
                .build()
                .map_err(|e| EdgeError::Verifier {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut server = builder.with_cert_resolver(Arc::new(Fixed(certified)));
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(Self {
            server: Arc::new(server),
            serial,
            subject,
            not_after,
            client_auth: files.client_ca.is_some(),
        })
    }
}

/// One certificate for every ClientHello (SNI plays no part: the listener has one).
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Where an edge listener's certificate is loaded from (the store keeps it current).
#[derive(Debug)]
pub struct EdgeSource(pub EdgeFiles);

impl Source for EdgeSource {
    type Value = Edge;
    type Error = EdgeError;
    const KIND: &'static str = "edge certificate";
    const REJECTED: &'static str =
        "edge certificate reload rejected; the previous certificate keeps serving";

    fn load(&self) -> Result<Edge, EdgeError> {
        Edge::load(&self.0)
    }

    fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.0.cert.as_path(), self.0.key.as_path()];
        files.extend(self.0.client_ca.as_deref());
        files
    }

    fn loaded(&self, pod: &PodName, edge: &Edge, previous: Option<&Edge>) {
        if edge.not_after <= crate::types::unix_now() {
            warn!(pod = %pod, cert = %self.0.cert.display(), not_after = edge.not_after,
                  "the edge certificate has expired: clients will refuse it until it is renewed");
        }
        let what = match previous {
            None => "edge certificate loaded",
            Some(old) if old.serial != edge.serial => {
                "edge certificate rotated: new handshakes use the new certificate"
            }
            Some(_) => "edge configuration reloaded",
        };
        info!(pod = %pod, cert = %self.0.cert.display(), serial = %edge.serial,
              subject = %edge.subject, not_after = edge.not_after,
              client_auth = edge.client_auth, "{what}");
    }
}

pub type EdgeStore = Store<EdgeSource>;
