//! Reading certificates, keys and CA bundles from PEM files: shared by the mesh identity
//! and the edge listeners, which wrap these errors with their own hints.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::sign::CertifiedKey;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, TrustAnchor};

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{key}: the private key does not match the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

fn invalid(path: &Path, reason: impl Into<String>) -> PemError {
    PemError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates in `path`, at least one; `none` says what an empty file means.
pub fn certs(path: &Path, none: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, format!("no CERTIFICATE block: {none}")));
    }
    Ok(certs)
}

/// The private key in `path`.
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(&read(path)?)
        .map_err(|e| invalid(path, format!("no PEM private key: {e}")))
}

/// The CA certificates in `path` as trust anchors.
pub fn anchors(path: &Path) -> Result<Vec<TrustAnchor<'static>>, PemError> {
    certs(path, "the CA bundle is empty")?
        .iter()
        .map(|c| {
            webpki::anchor_from_trusted_cert(c)
                .map(|a| a.to_owned())
                .map_err(|e| invalid(path, format!("unusable CA certificate: {e:?}")))
        })
        .collect()
}

/// A chain and its key, checked to belong together.
pub fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<CertifiedKey>, PemError> {
    CertifiedKey::from_der(chain, key, &crate::crypto::provider())
        .map(Arc::new)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => PemError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            },
            other => invalid(key_path, format!("unusable private key: {other}")),
        })
}

/// Warns when a private key file is readable by anyone but its owner.
pub fn warn_if_key_readable(key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(key) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(key = %key.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
                  "private key file is readable by group or others; it should be 0600");
        }
    }
}
