//! `agent ca init | issue`: a development CA and SPIFFE X.509-SVIDs, for demos and tests.
//! Production identities come from cert-manager, spiffe-helper or SPIRE as PEM files.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::identity::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, clap::Subcommand)]
pub enum CaCmd {
    /// Create a CA (ca.pem, ca.key with mode 0600) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Names the CA; SVIDs it issues may use any trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Issue an SVID: writes cert.pem, key.pem (0600) and bundle.pem to OUT.
    Issue {
        /// The CA directory made by `ca init`.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        spiffe_id: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        days: i64,
        /// Issue a certificate that expired yesterday (for testing rejection).
        #[arg(long)]
        expired: bool,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a file; secrets are created 0600 from the start (never chmod-ed afterwards).
fn write(path: &Path, data: &str, secret: bool) -> Result<(), CaError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(data.as_bytes()).map_err(io(path))
}

pub fn run(cmd: CaCmd) -> Result<String, CaError> {
    match cmd {
        CaCmd::Init { dir, trust_domain } => {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(Vec::<String>::new())?;
            p.distinguished_name
                .push(DnType::CommonName, format!("agent dev CA {trust_domain}"));
            p.distinguished_name
                .push(DnType::OrganizationName, trust_domain);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
            p.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
            let cert = p.self_signed(&key)?;
            write(&dir.join("ca.key"), &key.serialize_pem(), true)?;
            write(&dir.join("ca.pem"), &cert.pem(), false)?;
            Ok(format!(
                "CA written to {}/ca.pem (key ca.key, 0600)",
                dir.display()
            ))
        }
        CaCmd::Issue {
            dir,
            spiffe_id,
            out,
            days,
            expired,
        } => {
            let id = SpiffeId::parse(&spiffe_id).map_err(CaError::Invalid)?;
            let read = |name: &str| {
                let p = dir.join(name);
                std::fs::read_to_string(&p).map_err(|source| CaError::Io { path: p, source })
            };
            let (ca_pem, ca_key_pem) = (read("ca.pem")?, read("ca.key")?);
            let ca_key = KeyPair::from_pem(&ca_key_pem)?;
            let ca = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(Vec::<String>::new())?;
            p.distinguished_name.push(DnType::CommonName, id.as_str());
            p.subject_alt_names =
                vec![SanType::URI(id.as_str().try_into().map_err(|_| {
                    CaError::Invalid(format!("`{id}` is not an IA5 URI"))
                })?)];
            // The X.509-SVID spec: a leaf carries basicConstraints with cA false; the
            // spiffe crate (like go-spiffe) refuses an SVID without it.
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.use_authority_key_identifier_extension = true;
            let now = OffsetDateTime::now_utc();
            (p.not_before, p.not_after) = if expired {
                (now - Duration::days(2), now - Duration::days(1))
            } else {
                (
                    now - Duration::minutes(5),
                    now + Duration::days(days.max(1)),
                )
            };
            let cert = p.signed_by(&key, &ca, &ca_key)?;
            std::fs::create_dir_all(&out).map_err(io(&out))?;
            // Key first, certificate last: a watcher that fires in between sees a mismatch
            // and keeps the old identity rather than a half-written new one.
            write(&out.join("key.pem"), &key.serialize_pem(), true)?;
            write(&out.join("bundle.pem"), &ca_pem, false)?;
            write(&out.join("cert.pem"), &cert.pem(), false)?;
            Ok(format!("SVID for {id} written to {}", out.display()))
        }
    }
}
