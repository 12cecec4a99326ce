//! TLS 1.3 between agents: the rustls configs (built on the one provider of `crypto`),
//! and the SPIFFE verifiers used on both sides.
//!
//! Both verifiers check the peer's chain against the pod's current trust bundle with
//! webpki, then require exactly one SPIFFE ID in the same trust domain as the pod's own.
//! The client (outbound) side additionally requires the identity it expects for the
//! destination address when one is configured. Hostnames play no part: SVIDs name
//! workloads, not hosts.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

pub mod edge;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    ServerConfig, SignatureScheme,
};

use crate::{
    crypto::provider,
    identity::{chain_key, spiffe_id_of, IdentityStore, SpiffeId},
};

/// The ALPN protocol that marks an agent-to-agent connection.
pub const ALPN: &[u8] = b"agent.mtls/1";

pub fn server_config(store: Arc<IdentityStore>) -> Arc<ServerConfig> {
    let verifier = Arc::new(ClientVerifier {
        store: store.clone(),
    });
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(store);
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: every connection is a full handshake, so every connection verifies
    // the peer's *current* certificate against the *current* bundle (rotation, a shrunk
    // bundle or a changed expected identity take effect at once).
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Arc::new(cfg)
}

/// Expected identities of known workloads, by address.
pub type Expected = Arc<HashMap<IpAddr, SpiffeId>>;

pub fn client_config(store: Arc<IdentityStore>, expected: Expected) -> Arc<ClientConfig> {
    let verifier = Arc::new(ServerVerifier {
        store: store.clone(),
        expected,
    });
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(store);
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// Why a peer's identity was refused; carried inside rustls errors.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("peer {0} is from trust domain `{1}`, not ours (`{2}`)")]
    TrustDomain(SpiffeId, String, String),
    #[error("peer is {0}, expected {1}")]
    Unexpected(SpiffeId, SpiffeId),
    #[error("peer certificate: {0}")]
    NoSpiffeId(String),
}

impl Rejection {
    fn into_error(self) -> Error {
        Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// A short, stable reason for logs and counters.
pub fn reason(e: &Error) -> &'static str {
    match e {
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "untrusted_ca",
            CertificateError::Other(OtherError(inner)) => match inner.downcast_ref::<Rejection>() {
                Some(Rejection::TrustDomain(..)) => "wrong_trust_domain",
                Some(Rejection::Unexpected(..)) => "unexpected_identity",
                Some(Rejection::NoSpiffeId(..)) => "no_spiffe_id",
                None => "invalid_certificate",
            },
            _ => "invalid_certificate",
        },
        Error::AlertReceived(_) => "rejected_by_peer",
        Error::NoApplicationProtocol => "no_alpn",
        Error::InvalidMessage(_)
        | Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. } => "not_tls",
        _ => "handshake_failed",
    }
}

/// The handshake-signature methods, the same in both verifiers: TLS 1.2 is refused (only
/// 1.3 is offered), TLS 1.3 signatures are checked with the one provider.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Err(Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &provider().signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Which side of the handshake the peer is: what its certificate must be good for.
#[derive(Clone, Copy)]
enum PeerRole {
    Client,
    Server,
}

impl PeerRole {
    fn key_usage(self) -> webpki::KeyUsage {
        match self {
            PeerRole::Client => webpki::KeyUsage::client_auth(),
            PeerRole::Server => webpki::KeyUsage::server_auth(),
        }
    }
}

/// Chain to the bundle (or a cached verdict for the same chain under the same bundle),
/// then SPIFFE checks. Returns the peer's ID.
fn verify_peer(
    store: &IdentityStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, Error> {
    let ours = store.current();
    let key = chain_key(role as u8, end_entity, intermediates);
    if let Some(peer) = ours.chain_cache.get(&key, now.as_secs() as i64) {
        return same_trust_domain(peer, &ours.spiffe_id);
    }
    let ee = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let algs = provider().signature_verification_algorithms.all;
    ee.verify_for_usage(
        algs,
        &ours.anchors,
        intermediates,
        now,
        role.key_usage(),
        None,
        None,
    )
    .map_err(|e| {
        Error::InvalidCertificate(match e {
            webpki::Error::CertExpired { .. } => CertificateError::Expired,
            webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
            webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
            webpki::Error::BadDer | webpki::Error::BadDerTime => CertificateError::BadEncoding,
            other => CertificateError::Other(OtherError(Arc::new(other))),
        })
    })?;
    let peer = spiffe_id_of(end_entity).map_err(|r| Rejection::NoSpiffeId(r).into_error())?;
    ours.chain_cache
        .insert(key, peer.clone(), end_entity, intermediates);
    same_trust_domain(peer, &ours.spiffe_id)
}

fn same_trust_domain(peer: SpiffeId, ours: &SpiffeId) -> Result<SpiffeId, Error> {
    let td = ours.trust_domain();
    if peer.trust_domain() != td {
        let peer_td = peer.trust_domain().to_string();
        return Err(Rejection::TrustDomain(peer, peer_td, td.to_string()).into_error());
    }
    Ok(peer)
}

#[derive(Debug)]
struct ClientVerifier {
    store: Arc<IdentityStore>,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify_peer(
            &self.store,
            end_entity,
            intermediates,
            now,
            PeerRole::Client,
        )
        .map(|_| ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

#[derive(Debug)]
struct ServerVerifier {
    store: Arc<IdentityStore>,
    expected: Expected,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let peer = verify_peer(
            &self.store,
            end_entity,
            intermediates,
            now,
            PeerRole::Server,
        )?;
        if let ServerName::IpAddress(ip) = server_name {
            if let Some(want) = self.expected.get(&IpAddr::from(*ip)) {
                if *want != peer {
                    return Err(Rejection::Unexpected(peer, want.clone()).into_error());
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}
