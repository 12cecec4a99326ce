//! SPIFFE identities: X.509-SVIDs loaded from PEM files (chain, key, trust bundle), kept
//! current by a file watcher, and handed to rustls for every new handshake.
//!
//! A reload that fails (missing file, not PEM, key that does not match the certificate, no
//! SPIFFE ID) is rejected with the file and the reason, and the previous identity keeps
//! serving: new handshakes never see a half-written or broken identity.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    SignatureScheme,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::TrustAnchor;
use tracing::{info, warn};

use crate::{
    store::{Source, Store},
    types::PodName,
};

mod cert_facts;
mod chain_cache;
pub mod workload_api;
pub use cert_facts::CertFacts;
pub use chain_cache::{key as chain_key, ChainCache};
pub use workload_api::WorkloadApi;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source} (issue the SVID there, e.g. `agent ca issue`, or point the pod's cert, key and bundle at existing files)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{key}: the private key does not match the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("SPIFFE Workload API {endpoint}: {reason}")]
    WorkloadApi { endpoint: String, reason: String },
}

fn invalid(path: &Path, reason: impl Into<String>) -> IdentityError {
    IdentityError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl From<crate::pem::PemError> for IdentityError {
    fn from(e: crate::pem::PemError) -> Self {
        use crate::pem::PemError;
        match e {
            PemError::Read { path, source } => IdentityError::Read { path, source },
            PemError::Invalid { path, reason } => IdentityError::Invalid { path, reason },
            PemError::KeyMismatch { cert, key } => IdentityError::KeyMismatch { cert, key },
        }
    }
}

/// `spiffe://<trust-domain>/<path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct SpiffeId(String);

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("`{s}` is not a SPIFFE ID (must start with spiffe://)"))?;
        let td = rest.split('/').next().unwrap_or("");
        let td_ok = !td.is_empty()
            && td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if !td_ok {
            return Err(format!(
                "`{s}`: the trust domain must be lowercase letters, digits, '-', '.', '_'"
            ));
        }
        if rest.contains("//") || rest.ends_with('/') || rest.contains(['?', '#']) {
            return Err(format!("`{s}`: malformed path"));
        }
        Ok(Self(s.to_string()))
    }

    pub fn trust_domain(&self) -> &str {
        self.0["spiffe://".len()..].split('/').next().unwrap_or("")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The one SPIFFE ID in a certificate's URI SANs.
pub fn spiffe_id_of(cert: &[u8]) -> Result<SpiffeId, String> {
    let (_, x) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| format!("not a certificate: {e}"))?;
    let san = x
        .subject_alternative_name()
        .map_err(|e| format!("bad SAN extension: {e}"))?
        .ok_or("the certificate has no subjectAltName, so no SPIFFE ID")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => SpiffeId::parse(one),
        [] => Err("the certificate has no spiffe:// URI SAN".into()),
        _ => Err("the certificate has more than one SPIFFE ID".into()),
    }
}

/// A certificate's serial number as upper-case hex, written the way `openssl x509 -serial`
/// prints it, so operators can match the two.
pub fn serial_of(cert: &[u8]) -> String {
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert) else {
        return String::new();
    };
    let raw = x.raw_serial();
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02X}")).collect()
}

/// Where a pod's identity lives on disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

/// The file names of the identity layouts `--identity-dir` understands, in the order they
/// are tried: what `agent ca issue` writes, cert-manager's csi-driver-spiffe, and
/// spiffe-helper's defaults.
const LAYOUTS: [(&str, [&str; 3]); 3] = [
    ("agent ca", ["cert.pem", "key.pem", "bundle.pem"]),
    ("csi-driver-spiffe", ["tls.crt", "tls.key", "ca.crt"]),
    (
        "spiffe-helper",
        ["svid.pem", "svid_key.pem", "svid_bundle.pem"],
    ),
];

impl IdentityFiles {
    /// The identity files in `dir`, in whichever known layout is complete there.
    pub fn in_dir(dir: &Path) -> Result<Self, String> {
        if !dir.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        for (_, [cert, key, bundle]) in LAYOUTS {
            let files = Self {
                cert: dir.join(cert),
                key: dir.join(key),
                bundle: dir.join(bundle),
            };
            if [&files.cert, &files.key, &files.bundle]
                .iter()
                .all(|p| p.exists())
            {
                return Ok(files);
            }
        }
        let known: Vec<String> = LAYOUTS
            .iter()
            .map(|(who, names)| format!("{} ({who})", names.join(", ")))
            .collect();
        Err(format!(
            "{} holds no complete identity; expected one of: {}",
            dir.display(),
            known.join("; ")
        ))
    }
}

/// A loaded, consistent identity.
pub struct Identity {
    pub spiffe_id: SpiffeId,
    pub certified: Arc<CertifiedKey>,
    pub anchors: Vec<TrustAnchor<'static>>,
    pub not_after: i64,
    pub serial: String,
    pub issuer: String,
    /// Peer chains verified against this identity's bundle.
    pub chain_cache: ChainCache,
}

impl Identity {
    pub fn load(files: &IdentityFiles) -> Result<Self, IdentityError> {
        use crate::pem;
        let chain = pem::certs(&files.cert, "is this a PEM certificate file?")?;
        let key = pem::key(&files.key)?;
        let anchors = pem::anchors(&files.bundle)?;
        let id = Self::from_parts(chain, key, anchors, &files.cert, &files.key)?;
        pem::warn_if_key_readable(&files.key);
        Ok(id)
    }

    /// An identity from its chain, key and trust anchors, however they arrived; `cert` and
    /// `key` name where they came from in errors.
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: rustls_pki_types::PrivateKeyDer<'static>,
        anchors: Vec<TrustAnchor<'static>>,
        cert: &Path,
        key_path: &Path,
    ) -> Result<Self, IdentityError> {
        let first = chain
            .first()
            .ok_or_else(|| invalid(cert, "no certificate"))?;
        let spiffe_id = spiffe_id_of(first).map_err(|r| invalid(cert, r))?;
        let (_, leaf) = x509_parser::parse_x509_certificate(first)
            .map_err(|e| invalid(cert, format!("not a certificate: {e}")))?;
        let not_after = leaf.validity().not_after.timestamp();
        let serial = serial_of(first);
        let issuer = leaf.issuer().to_string();
        let certified = crate::pem::certified(chain, key, cert, key_path)?;
        if not_after <= crate::types::unix_now() {
            warn!(cert = %cert.display(), spiffe_id = %spiffe_id, not_after,
                  "the certificate has expired: peers will reject this pod until it is renewed");
        }
        Ok(Self {
            spiffe_id,
            certified,
            anchors,
            not_after,
            serial,
            issuer,
            chain_cache: Default::default(),
        })
    }
}

/// Where a pod's identity comes from (the store keeps it current).
#[derive(Debug)]
pub enum IdentitySource {
    /// PEM files, watched and reloaded.
    Files(IdentityFiles),
    /// The SPIFFE Workload API, whose stream pushes every new SVID.
    WorkloadApi(WorkloadApi),
}

impl Source for IdentitySource {
    type Value = Identity;
    type Error = IdentityError;
    const KIND: &'static str = "identity";
    const REJECTED: &'static str = "identity reload rejected; the previous identity keeps serving";

    fn load(&self) -> Result<Identity, IdentityError> {
        match self {
            Self::Files(files) => Identity::load(files),
            // Never asked: the source has no files, so nothing reloads it, and its first
            // identity is the stream's first update (`workload_api::start`).
            Self::WorkloadApi(w) => Err(IdentityError::WorkloadApi {
                endpoint: w.endpoint.clone(),
                reason: "its identities arrive on the stream; there is nothing to read".into(),
            }),
        }
    }

    fn files(&self) -> Vec<&Path> {
        match self {
            Self::Files(f) => vec![&f.cert, &f.key, &f.bundle],
            Self::WorkloadApi(_) => Vec::new(),
        }
    }

    fn loaded(&self, pod: &PodName, id: &Identity, previous: Option<&Identity>) {
        match previous {
            None => info!(pod = %pod, spiffe_id = %id.spiffe_id, serial = %id.serial,
                          not_after = id.not_after, issuer = %id.issuer, "identity loaded"),
            Some(old) if old.serial != id.serial => {
                info!(pod = %pod, spiffe_id = %id.spiffe_id, serial = %id.serial,
                      not_after = id.not_after, "identity rotated: new handshakes use the new certificate")
            }
            Some(_) => {}
        }
    }
}

/// The identity a pod presents now; swapped atomically on rotation.
pub type IdentityStore = Store<IdentitySource>;

/// The verified identity of the peer of a mutual TLS connection, read from the
/// certificate it presented in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub id: SpiffeId,
    /// The certificate's serial number, as `openssl x509 -serial` prints it.
    pub serial: String,
}

impl PeerIdentity {
    /// From the chain a completed handshake verified (its leaf carries the one SPIFFE ID
    /// the verifier already required).
    pub fn from_chain(certs: Option<&[CertificateDer<'_>]>) -> Option<Self> {
        let leaf = certs?.first()?;
        Some(Self {
            id: spiffe_id_of(leaf).ok()?,
            serial: serial_of(leaf),
        })
    }
}

impl ResolvesServerCert for IdentityStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().certified.clone())
    }
}

impl ResolvesClientCert for IdentityStore {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_dir_layouts() {
        let dir = std::env::temp_dir().join(format!("identity-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = IdentityFiles::in_dir(&dir).unwrap_err();
        assert!(
            err.contains("tls.crt, tls.key, ca.crt (csi-driver-spiffe)"),
            "{err}"
        );
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        assert_eq!(
            IdentityFiles::in_dir(&dir).unwrap().bundle,
            dir.join("ca.crt")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn spiffe_ids() {
        let id = SpiffeId::parse("spiffe://example.org/ns/a/sa/b").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert!(SpiffeId::parse("https://example.org/x").is_err());
        assert!(SpiffeId::parse("spiffe://Example.org/x").is_err());
        assert!(SpiffeId::parse("spiffe:///x").is_err());
        assert!(SpiffeId::parse("spiffe://td/a//b").is_err());
    }
}
