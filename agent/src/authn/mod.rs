//! End-user authentication in front of an application that has none: JWT bearer tokens
//! from trusted issuers, or basic authentication from a hashed credentials file, checked
//! on a pod's `authn` ports before its policy decides the request (claims are usable in
//! rules), with the verified subject passed to the app in a header the agent controls.

pub mod basic;
mod claims;
pub mod jwt;

pub use claims::Claims;

use std::sync::Arc;

use http::{header, HeaderMap, HeaderName};

/// Why a request was not authenticated: the `error_description` of the 401 and the
/// counter's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Missing,
    Malformed,
    UnknownIssuer,
    UnknownKey,
    WrongAlgorithm,
    BadSignature,
    Expired,
    NotYetValid,
    WrongAudience,
    MissingClaim,
    /// Basic: an unknown user or a wrong password.
    BadCredentials,
    /// Basic: every password check slot is taken (a flood); try again.
    Busy,
}

impl Rejection {
    pub const fn as_str(self) -> &'static str {
        match self {
            Rejection::Missing => "missing",
            Rejection::Malformed => "malformed",
            Rejection::UnknownIssuer => "unknown_issuer",
            Rejection::UnknownKey => "unknown_key",
            Rejection::WrongAlgorithm => "wrong_algorithm",
            Rejection::BadSignature => "bad_signature",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::WrongAudience => "wrong_audience",
            Rejection::MissingClaim => "missing_claim",
            Rejection::BadCredentials => "bad_credentials",
            Rejection::Busy => "busy",
        }
    }
}

/// A pod's end-user authentication, as the proxy applies it.
pub struct Authn {
    /// The ports it applies to (empty: every port whose requests the agent inspects).
    pub ports: Vec<u16>,
    /// Where the app finds the verified subject (whatever a client sent there is removed).
    pub subject_header: Option<HeaderName>,
    /// Leave the verified `Authorization` header on the request to the application.
    pub forward_token: bool,
    pub issuers: Vec<jwt::Issuer>,
    pub basic: Option<basic::Basic>,
}

impl std::fmt::Debug for Authn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authn")
            .field("ports", &self.ports)
            .field(
                "issuers",
                &self.issuers.iter().map(|i| &i.issuer).collect::<Vec<_>>(),
            )
            .field("basic", &self.basic.as_ref().map(|b| &b.realm))
            .finish()
    }
}

impl Authn {
    pub fn applies_to(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }

    /// Whether connections to `port` must be served as HTTP even when the policy would
    /// decide them whole: a listed port is authenticated whatever the rules are.
    pub fn forces_inspection(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }

    /// The `WWW-Authenticate` challenges of a 401 for `why`, one per accepted scheme.
    /// RFC 6750: a request without a token gets a bare Bearer challenge, a bad token
    /// `invalid_token` and the reason; Basic has no error parameters.
    pub fn challenges(&self, realm: &str, why: Rejection) -> Vec<String> {
        let mut out = Vec::new();
        if !self.issuers.is_empty() {
            out.push(match why {
                Rejection::Missing | Rejection::BadCredentials | Rejection::Busy => {
                    format!("Bearer realm=\"{realm}\"")
                }
                r => format!(
                    "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{}\"",
                    r.as_str()
                ),
            });
        }
        if let Some(b) = &self.basic {
            out.push(format!("Basic realm=\"{}\", charset=\"UTF-8\"", b.realm));
        }
        out
    }

    /// The verified identity of the request's `Authorization` header (a bearer token's
    /// claims, or a basic user as `sub`), or why there is none.
    pub async fn check(&self, headers: &HeaderMap, now: u64) -> Result<Arc<Claims>, Rejection> {
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(Rejection::Missing)?
            .to_str()
            .map_err(|_| Rejection::Malformed)?;
        let (scheme, rest) = value.split_once(' ').ok_or(Rejection::Malformed)?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !self.issuers.is_empty() {
            return self.bearer(rest, now);
        }
        match &self.basic {
            Some(b) if scheme.eq_ignore_ascii_case("basic") => b.verify(rest).await,
            // A scheme this pod does not accept is no credential at all.
            _ => Err(Rejection::Missing),
        }
    }

    /// The verified claims of a bearer token.
    pub fn bearer(&self, token: &str, now: u64) -> Result<Arc<Claims>, Rejection> {
        let iss = jwt::peek_issuer(token).ok_or(Rejection::Malformed)?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or(Rejection::UnknownIssuer)?;
        issuer.verify(token, now)
    }
}

/// Seconds since the Unix epoch, as token times are written.
pub fn now() -> u64 {
    crate::types::unix_now().max(0) as u64
}
