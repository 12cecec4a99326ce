//! End-user authentication in front of an application that has none: JWT bearer tokens
//! from trusted issuers, checked on a pod's `authn` ports before its policy decides the
//! request (claims are usable in rules), with the verified subject passed to the app in a
//! header the agent controls.

mod claims;
pub mod jwt;

pub use claims::Claims;

use std::sync::Arc;

use http::{header, HeaderMap, HeaderName};
pub use jwt::Rejection;

/// A pod's end-user authentication, as the proxy applies it.
pub struct Authn {
    /// The ports it applies to (empty: every port whose requests the agent inspects).
    pub ports: Vec<u16>,
    /// Where the app finds the verified subject (whatever a client sent there is removed).
    pub subject_header: Option<HeaderName>,
    /// Leave the verified `Authorization` header on the request to the application.
    pub forward_token: bool,
    pub issuers: Vec<jwt::Issuer>,
}

impl std::fmt::Debug for Authn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authn")
            .field("ports", &self.ports)
            .field(
                "issuers",
                &self.issuers.iter().map(|i| &i.issuer).collect::<Vec<_>>(),
            )
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

    /// The `WWW-Authenticate` challenge of a 401 for `why` (RFC 6750: a request without a
    /// token gets no error code, a bad token `invalid_token` and the reason).
    pub fn challenge(&self, realm: &str, why: Rejection) -> String {
        match why {
            Rejection::Missing => format!("Bearer realm=\"{realm}\""),
            r => format!(
                "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{}\"",
                r.as_str()
            ),
        }
    }

    /// The verified claims of the request's bearer token, or why there are none.
    pub fn check(&self, headers: &HeaderMap, now: u64) -> Result<Arc<Claims>, Rejection> {
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(Rejection::Missing)?
            .to_str()
            .map_err(|_| Rejection::Malformed)?;
        let (scheme, token) = value.split_once(' ').ok_or(Rejection::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Rejection::Missing);
        }
        let token = token.trim();
        let iss = jwt::peek_issuer(token).ok_or(Rejection::Malformed)?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or(Rejection::UnknownIssuer)?;
        issuer.verify(token, now)
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
