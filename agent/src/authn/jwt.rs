//! JWT bearer tokens: issuers with a JWKS from a file (a [`Store`], so hot-reloaded with
//! the last good key set kept on a bad file), ES256, RS256 and EdDSA, `iss`, `aud`, `exp`
//! and `nbf` with a clock skew. Symmetric keys are refused: a JWKS carries public keys, and
//! an HMAC key there would let anyone who can read it mint tokens.
//!
//! Verified tokens are cached per key set (bounded, dropped when the set reloads), so a
//! client that sends the same token on every request pays for one signature check.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use base64::Engine;
use dashmap::DashMap;
use jsonwebtoken::{
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm},
    Algorithm, DecodingKey, Validation,
};
use tracing::info;

use super::{claims::Claims, Rejection};
use crate::{
    store::{Source, Store},
    types::PodName,
};

/// Verified tokens kept per key set; past this, the cache is emptied and refilled.
const CACHE_ENTRIES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error(
        "cannot read the JWKS {path}: {source} (point `jwks` at the issuer's key set, as JSON)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("JWKS {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// One key of a set: what it verifies and with which algorithm.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// A loaded key set, and the tokens verified with it.
pub struct Jwks {
    keys: Vec<Key>,
    cache: DashMap<String, Arc<Cached>>,
}

struct Cached {
    claims: Arc<Claims>,
    exp: u64,
    nbf: Option<u64>,
}

impl Jwks {
    pub fn load(path: &Path) -> Result<Self, JwksError> {
        let invalid = |reason: String| JwksError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read(path).map_err(|source| JwksError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let set: JwkSet =
            serde_json::from_slice(&text).map_err(|e| invalid(format!("not a JWK set: {e}")))?;
        let mut keys = Vec::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::OctetKey(_), _) => {
                    return Err(invalid(format!(
                        "keys[{i}] is a symmetric key: a JWKS for verification holds public keys only"
                    )))
                }
                (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
                    if p.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::OctetKeyPair(p), None | Some(KeyAlgorithm::EdDSA))
                    if p.curve == EllipticCurve::Ed25519 =>
                {
                    Algorithm::EdDSA
                }
                (_, alg) => {
                    return Err(invalid(format!(
                        "keys[{i}]: unsupported key or algorithm ({alg:?}); ES256 (P-256), RS256 and EdDSA (Ed25519) are"
                    )))
                }
            };
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| invalid(format!("keys[{i}]: unusable key: {e}")))?;
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            });
        }
        if keys.is_empty() {
            return Err(invalid("the key set is empty".into()));
        }
        Ok(Self {
            keys,
            cache: DashMap::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// One trusted issuer.
pub struct Issuer {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub skew_seconds: u64,
    pub jwks: Arc<JwksStore>,
}

impl Issuer {
    /// Verifies `token` (already known to name this issuer) with the current key set.
    pub fn verify(&self, token: &str, now: u64) -> Result<Arc<Claims>, Rejection> {
        let jwks = self.jwks.current();
        if let Some(hit) = jwks.cache.get(token).map(|c| c.clone()) {
            return self.times(&hit, now).map(|_| hit.claims.clone());
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| Rejection::Malformed)?;
        let candidates = jwks.keys.iter().filter(|k| match (&header.kid, &k.kid) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        });
        let mut last = Rejection::UnknownKey;
        for key in candidates {
            if key.alg != header.alg {
                last = Rejection::WrongAlgorithm;
                continue;
            }
            let mut v = Validation::new(key.alg);
            v.set_issuer(&[&self.issuer]);
            if self.audiences.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&self.audiences);
            }
            v.leeway = self.skew_seconds;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "iss"]);
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token, &key.key, &v,
            ) {
                Ok(data) => {
                    let all: std::collections::BTreeMap<_, _> = data.claims.into_iter().collect();
                    let num = |n: &str| all.get(n).and_then(serde_json::Value::as_u64);
                    let cached = Arc::new(Cached {
                        exp: num("exp").unwrap_or(0),
                        nbf: num("nbf"),
                        claims: Arc::new(Claims {
                            issuer: self.issuer.clone(),
                            subject: all
                                .get("sub")
                                .and_then(|s| s.as_str())
                                .unwrap_or("")
                                .to_string(),
                            all,
                        }),
                    });
                    if jwks.cache.len() >= CACHE_ENTRIES {
                        jwks.cache.clear();
                    }
                    jwks.cache.insert(token.to_string(), cached.clone());
                    return Ok(cached.claims.clone());
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::InvalidSignature => Rejection::BadSignature,
                        K::ExpiredSignature => Rejection::Expired,
                        K::ImmatureSignature => Rejection::NotYetValid,
                        K::InvalidAudience => Rejection::WrongAudience,
                        K::InvalidIssuer => Rejection::UnknownIssuer,
                        K::MissingRequiredClaim(_) => Rejection::MissingClaim,
                        K::InvalidAlgorithm => Rejection::WrongAlgorithm,
                        _ => Rejection::Malformed,
                    };
                    // A bad signature under one key may verify under another of the set
                    // (no kid): only that case tries on.
                    if last != Rejection::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    /// A cached token's times, checked again: time has passed since it was verified.
    fn times(&self, c: &Cached, now: u64) -> Result<(), Rejection> {
        if c.exp.saturating_add(self.skew_seconds) < now {
            return Err(Rejection::Expired);
        }
        if c.nbf
            .is_some_and(|nbf| nbf > now.saturating_add(self.skew_seconds))
        {
            return Err(Rejection::NotYetValid);
        }
        Ok(())
    }
}

/// The `iss` of a token, read without verifying it (only to pick the issuer whose keys
/// will verify it).
pub fn peek_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    serde_json::from_slice::<Iss>(&bytes).ok()?.iss
}

/// Where an issuer's key set is loaded from.
#[derive(Debug)]
pub struct JwksSource {
    pub path: PathBuf,
    pub issuer: String,
}

impl Source for JwksSource {
    type Value = Jwks;
    type Error = JwksError;
    const KIND: &'static str = "jwks";
    const REJECTED: &'static str = "JWKS reload rejected; the previous key set keeps verifying";

    fn load(&self) -> Result<Jwks, JwksError> {
        Jwks::load(&self.path)
    }

    fn files(&self) -> Vec<&Path> {
        vec![&self.path]
    }

    fn loaded(&self, pod: &PodName, jwks: &Jwks, previous: Option<&Jwks>) {
        let what = if previous.is_some() {
            "JWKS reloaded"
        } else {
            "JWKS loaded"
        };
        info!(pod = %pod, issuer = %self.issuer, jwks = %self.path.display(), keys = jwks.len(), "{what}");
    }
}

pub type JwksStore = Store<JwksSource>;
