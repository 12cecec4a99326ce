//! What the agent enrolled, recorded under its state directory (`<state_dir>/pods/NAME.json`,
//! one file per pod, each replaced atomically), so that a restarted agent, after a clean
//! stop or a SIGKILL, knows which pods to re-adopt and which it left blocked.
//!
//! A record keeps the request as it was made (re-validated on restart, so a changed
//! default policy applies), the pod's id, and the identity of its network namespace, so a
//! namespace that was deleted and re-created under the same path is not mistaken for it.

use std::{
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{spec::PodRequest, types::PodId};

const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "state directory {path}: {source} (set state_dir to a writable directory, e.g. under /run)"
    )]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where a recorded pod came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A `[[pod]]` of the config file (or `--pod`).
    Config,
    /// `agent enroll` / the admin API.
    Api,
}

/// What the agent holds for the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Served: re-adopt it after a restart.
    Enrolled,
    /// Released (or not adoptable) and fail-closed: its pinned programs refuse its
    /// connections until it is enrolled again or its namespace goes away.
    Blocked,
}

/// One pod's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub version: u32,
    pub pod_id: PodId,
    pub origin: Origin,
    pub status: Status,
    /// The network namespace as (device, inode) on nsfs.
    pub netns_dev: u64,
    pub netns_ino: u64,
    pub request: PodRequest,
}

impl Record {
    pub fn new(
        pod_id: PodId,
        origin: Origin,
        status: Status,
        netns: (u64, u64),
        request: PodRequest,
    ) -> Self {
        Self {
            version: VERSION,
            pod_id,
            origin,
            status,
            netns_dev: netns.0,
            netns_ino: netns.1,
            request,
        }
    }

    /// Whether the recorded namespace is still the one at its path.
    pub fn netns_exists(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.request.netns)
            .is_ok_and(|m| m.dev() == self.netns_dev && m.ino() == self.netns_ino)
    }
}

/// A state file that could not be read: the pod it names stays as the kernel has it.
#[derive(Debug, Clone)]
pub struct Unreadable {
    /// The pod name, from the file name.
    pub name: String,
    pub path: PathBuf,
    pub reason: String,
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Creates `<state_dir>/pods` (mode 0700) if needed.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        let dir = state_dir.join("pods");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| StateError::Dir {
                path: dir.clone(),
                source,
            })?;
        Ok(Self { dir })
    }

    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Replaces the pod's record atomically: a new file is written and synced, then
    /// renamed over the old one, so a crash leaves the old record or the new one.
    pub fn write(&self, name: &str, record: &Record) -> Result<(), StateError> {
        let path = self.path_of(name);
        let tmp = self.dir.join(format!(".{name}.json.tmp"));
        let err = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(record).map_err(|e| err(e.into()))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&text).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Forgets the pod. Idempotent.
    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.path_of(name));
    }

    /// Every record, and every file that is not a readable record.
    pub fn read_all(&self) -> (Vec<Record>, Vec<Unreadable>) {
        let (mut records, mut bad) = (Vec::new(), Vec::new());
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return (records, bad);
        };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        for path in paths {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<Record>(&bytes).map_err(|e| e.to_string())
                })
                .and_then(|r| {
                    if r.version != VERSION {
                        Err(format!(
                            "version {} (this agent reads {VERSION})",
                            r.version
                        ))
                    } else if r.request.name != name {
                        Err(format!("records pod `{}`, not `{name}`", r.request.name))
                    } else {
                        Ok(r)
                    }
                });
            match parsed {
                Ok(r) => records.push(r),
                Err(reason) => bad.push(Unreadable { name, path, reason }),
            }
        }
        (records, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("agent-state-test-{}-{n}", std::process::id()))
    }

    fn record(name: &str) -> Record {
        Record::new(
            PodId(3),
            Origin::Api,
            Status::Enrolled,
            (1, 2),
            crate::spec::tests::request(name),
        )
    }

    #[test]
    fn records_round_trip_and_corrupt_files_are_reported() {
        let root = dir();
        let state = StateDir::open(&root).unwrap();
        state.write("a", &record("a")).unwrap();
        state.write("b", &record("b")).unwrap();
        std::fs::write(state.path_of("b"), "{ not json").unwrap();
        std::fs::write(
            state.path_of("c"),
            serde_json::to_vec(&record("x")).unwrap(),
        )
        .unwrap();
        let (ok, bad) = state.read_all();
        assert_eq!(ok, vec![record("a")]);
        let reasons: Vec<_> = bad
            .iter()
            .map(|b| (b.name.as_str(), b.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].1.contains("line 1"), "{reasons:?}");
        assert!(reasons[1].1.contains("records pod `x`"), "{reasons:?}");
        state.remove("a");
        state.remove("a");
        assert!(state.read_all().0.is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }
}
