//! Basic authentication from a hashed credentials file, for the simple case: `user:hash`
//! lines as `htpasswd -B` writes them (bcrypt, `$2y$`/`$2b$`/`$2a$`) or with an Argon2 PHC
//! string (`$argon2id$...`). Plain, MD5 (`$apr1$`), SHA-1 and crypt hashes are refused when
//! the file is loaded: they can be brute-forced from a leaked file.
//!
//! A password hash costs tens of milliseconds by design, which a flood of bad passwords
//! would turn into a denial of service: checks run off the async workers, at most
//! [`CONCURRENT_CHECKS`] at a time (the rest are refused at once), and a verified header
//! is remembered (by its SHA-256, with the file's contents) so a client sending the same
//! credentials on every request pays once.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use base64::Engine;
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::info;

use super::{claims::Claims, Rejection};
use crate::{
    store::{Source, Store},
    types::PodName,
};

/// Password checks that may run at once per pod; more are refused (`busy`), not queued.
pub const CONCURRENT_CHECKS: usize = 2;
/// Verified credentials remembered per file version.
const CACHE_ENTRIES: usize = 1024;
/// The bcrypt cost of the decoy hash (what `htpasswd -B` uses by default).
const DECOY_COST: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum HtpasswdError {
    #[error("cannot read the credentials file {path}: {source} (point `htpasswd` at user:hash lines, e.g. from `htpasswd -B`)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

enum Hash {
    Bcrypt(String),
    Argon2(String),
}

/// A loaded credentials file.
pub struct Htpasswd {
    users: HashMap<String, Hash>,
    /// Checked for unknown users, so an unknown name takes as long as a wrong password
    /// and timing does not tell which users exist.
    decoy: String,
    verified: DashMap<[u8; 32], Arc<Claims>>,
}

impl Htpasswd {
    pub fn load(path: &Path) -> Result<Self, HtpasswdError> {
        let text = std::fs::read_to_string(path).map_err(|source| HtpasswdError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let invalid = |reason: String| HtpasswdError::Invalid {
                path: path.to_path_buf(),
                line: i + 1,
                reason,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| invalid("expected user:hash".into()))?;
            if user.is_empty() {
                return Err(invalid("empty user name".into()));
            }
            let hash = if ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
                Hash::Bcrypt(hash.to_string())
            } else if hash.starts_with("$argon2") {
                argon2::PasswordHash::new(hash).map_err(|e| {
                    invalid(format!("user `{user}`: not an Argon2 PHC string: {e}"))
                })?;
                Hash::Argon2(hash.to_string())
            } else {
                return Err(invalid(format!(
                    "user `{user}`: only bcrypt ($2y$, `htpasswd -B`) and Argon2 ($argon2id$) hashes are accepted"
                )));
            };
            if users.insert(user.to_string(), hash).is_some() {
                return Err(invalid(format!("user `{user}` is listed twice")));
            }
        }
        if users.is_empty() {
            return Err(HtpasswdError::Invalid {
                path: path.to_path_buf(),
                line: 0,
                reason: "no users".into(),
            });
        }
        Ok(Self {
            users,
            decoy: bcrypt::hash("decoy", DECOY_COST).unwrap_or_default(),
            verified: DashMap::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// A pod's basic authentication.
pub struct Basic {
    pub realm: String,
    pub htpasswd: Arc<HtpasswdStore>,
    pub checks: Semaphore,
}

impl Basic {
    /// Verifies the credentials of an `Authorization: Basic` header (`encoded` is what
    /// follows the scheme).
    pub async fn verify(&self, encoded: &str) -> Result<Arc<Claims>, Rejection> {
        let file = self.htpasswd.current();
        let key: [u8; 32] = Sha256::digest(encoded.as_bytes()).into();
        if let Some(hit) = file.verified.get(&key) {
            return Ok(hit.clone());
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| Rejection::Malformed)?;
        let text = String::from_utf8(decoded).map_err(|_| Rejection::Malformed)?;
        let (user, password) = text.split_once(':').ok_or(Rejection::Malformed)?;
        let (known, hash) = match file.users.get(user) {
            Some(Hash::Bcrypt(h)) => (true, Hash::Bcrypt(h.clone())),
            Some(Hash::Argon2(h)) => (true, Hash::Argon2(h.clone())),
            None => (false, Hash::Bcrypt(file.decoy.clone())),
        };
        let _slot = self.checks.try_acquire().map_err(|_| Rejection::Busy)?;
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || match hash {
            Hash::Bcrypt(h) => bcrypt::verify(password, &h).unwrap_or(false),
            Hash::Argon2(h) => argon2::PasswordHash::new(&h).is_ok_and(|parsed| {
                use argon2::PasswordVerifier;
                argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            }),
        })
        .await
        .unwrap_or(false);
        if !ok || !known {
            return Err(Rejection::BadCredentials);
        }
        let claims = Arc::new(Claims {
            issuer: "basic".into(),
            subject: user.to_string(),
            all: [("sub".to_string(), serde_json::Value::from(user))]
                .into_iter()
                .collect(),
        });
        if file.verified.len() >= CACHE_ENTRIES {
            file.verified.clear();
        }
        file.verified.insert(key, claims.clone());
        Ok(claims)
    }
}

/// Where a pod's credentials file is loaded from.
#[derive(Debug)]
pub struct HtpasswdSource(pub PathBuf);

impl Source for HtpasswdSource {
    type Value = Htpasswd;
    type Error = HtpasswdError;
    const KIND: &'static str = "htpasswd";
    const REJECTED: &'static str =
        "credentials file reload rejected; the previous users keep authenticating";

    fn load(&self) -> Result<Htpasswd, HtpasswdError> {
        Htpasswd::load(&self.0)
    }

    fn files(&self) -> Vec<&Path> {
        vec![&self.0]
    }

    fn loaded(&self, pod: &PodName, file: &Htpasswd, previous: Option<&Htpasswd>) {
        let what = if previous.is_some() {
            "credentials file reloaded"
        } else {
            "credentials file loaded"
        };
        info!(pod = %pod, htpasswd = %self.0.display(), users = file.len(), "{what}");
    }
}

pub type HtpasswdStore = Store<HtpasswdSource>;

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("htpasswd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn weak_or_broken_files_are_refused_with_the_line() {
        let cases = [
            ("alice:$apr1$abc$def\n", 1, "only bcrypt"),
            ("# users\nalice\n", 2, "expected user:hash"),
            ("alice:{SHA}x\n", 1, "only bcrypt"),
            ("\n", 0, "no users"),
        ];
        for (i, (text, line, why)) in cases.iter().enumerate() {
            match Htpasswd::load(&file(&format!("bad{i}"), text)) {
                Err(HtpasswdError::Invalid {
                    line: l, reason, ..
                }) => {
                    assert_eq!(l, *line, "{text}: {reason}");
                    assert!(reason.contains(why), "{text}: {reason}");
                }
                Err(e) => panic!("{text}: {e}"),
                Ok(_) => panic!("{text}: accepted"),
            }
        }
        let hash = bcrypt::hash("pw", 4).unwrap();
        let dup = Htpasswd::load(&file("dup", &format!("a:{hash}\na:{hash}\n")));
        assert!(dup.err().unwrap().to_string().contains("listed twice"));
    }

    #[tokio::test]
    async fn checks_beyond_the_slots_are_refused_and_verified_ones_remembered() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let path = file("users", &format!("alice:{hash}\n"));
        let store =
            HtpasswdStore::load(PodName::parse("p").unwrap(), HtpasswdSource(path)).unwrap();
        let basic = Basic {
            realm: "p".into(),
            htpasswd: store,
            checks: Semaphore::new(1),
        };
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let good = b64("alice:pw");
        assert_eq!(basic.verify(&good).await.unwrap().subject, "alice");
        assert_eq!(
            basic.verify(&b64("alice:nope")).await.unwrap_err(),
            Rejection::BadCredentials
        );
        assert_eq!(
            basic.verify(&b64("mallory:pw")).await.unwrap_err(),
            Rejection::BadCredentials
        );
        // Every slot taken (a flood in progress): a new guess is refused at once, while
        // credentials verified before still pass without a slot.
        let _held = basic.checks.try_acquire().unwrap();
        assert_eq!(
            basic.verify(&b64("alice:guess")).await.unwrap_err(),
            Rejection::Busy
        );
        assert_eq!(basic.verify(&good).await.unwrap().subject, "alice");
    }
}
