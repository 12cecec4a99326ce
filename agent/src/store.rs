//! One mechanism for everything a pod serves from files that change under it (its identity
//! and its policy): load once, swap atomically on change, keep the last good value when a
//! new one is bad, count both outcomes.
//!
//! Directories are watched, not the files: Kubernetes Secrets, ConfigMaps and cert-manager
//! replace files by renaming or by swapping symlinks, which a watch on the file itself
//! misses. Events are debounced because writers replace related files in separate steps.
//! Readers get an `Arc` of the current value without taking a lock (`arc-swap`), so the
//! accept path never waits for a reload.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tracing::error;

use crate::types::PodName;

const DEBOUNCE: Duration = Duration::from_millis(150);

/// Where a store's value comes from.
pub trait Source: Send + Sync + 'static {
    type Value: Send + Sync + 'static;
    type Error: std::fmt::Display;
    /// What the store holds, for logs: "identity", "policy".
    const KIND: &'static str;
    /// The log message when a reload is rejected (says what keeps serving).
    const REJECTED: &'static str;
    fn load(&self) -> Result<Self::Value, Self::Error>;
    /// The files whose change means a reload (none: the value never changes).
    fn files(&self) -> Vec<&Path>;
    /// Reports a value that was just put in force (`previous` is `None` the first time).
    fn loaded(&self, pod: &PodName, value: &Self::Value, previous: Option<&Self::Value>);
}

/// The value a pod is served with now.
pub struct Store<S: Source> {
    pod: PodName,
    source: S,
    current: ArcSwap<S::Value>,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

impl<S: Source> std::fmt::Debug for Store<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("kind", &S::KIND)
            .field("pod", &self.pod)
            .finish()
    }
}

impl<S: Source> Store<S> {
    /// Loads the first value; an error here means the pod cannot be enrolled.
    pub fn load(pod: PodName, source: S) -> Result<Arc<Self>, S::Error> {
        let value = source.load()?;
        source.loaded(&pod, &value, None);
        Ok(Arc::new(Self {
            pod,
            source,
            current: ArcSwap::from_pointee(value),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        }))
    }

    pub fn current(&self) -> Arc<S::Value> {
        self.current.load_full()
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    /// Loads again; on failure the previous value stays in force.
    pub fn reload(&self) {
        if self.source.files().is_empty() {
            return;
        }
        match self.source.load() {
            Ok(value) => {
                self.source.loaded(&self.pod, &value, Some(&self.current()));
                self.current.store(Arc::new(value));
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                error!(pod = %self.pod, kind = S::KIND, error = %e, "{}", S::REJECTED);
            }
        }
    }

    /// Reloads whenever the source's files change, for as long as the returned watcher and
    /// the store both live. `None` when there is nothing to watch.
    pub fn watch(self: &Arc<Self>) -> notify::Result<Option<notify::RecommendedWatcher>> {
        let files = self.source.files();
        if files.is_empty() {
            return Ok(None);
        }
        let name = format!("{}-{}", S::KIND, self.pod);
        watch_dirs(&files, name, Arc::downgrade(self)).map(Some)
    }
}

fn watch_dirs<S: Source>(
    files: &[&Path],
    name: String,
    target: Weak<Store<S>>,
) -> notify::Result<notify::RecommendedWatcher> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.send(());
        }
    })?;
    let mut dirs: Vec<&Path> = files.iter().filter_map(|p| p.parent()).collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        watcher.watch(d, RecursiveMode::NonRecursive)?;
    }
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            // Ends when the watcher (and with it the sender) is dropped.
            while rx.recv().is_ok() {
                std::thread::sleep(DEBOUNCE);
                while rx.try_recv().is_ok() {}
                let Some(target) = target.upgrade() else {
                    return;
                };
                target.reload();
            }
        })
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// A value read from one file, which may be made to fail.
    struct Text {
        path: std::path::PathBuf,
        broken: AtomicBool,
    }

    impl Source for Text {
        type Value = String;
        type Error = String;
        const KIND: &'static str = "text";
        const REJECTED: &'static str = "text reload rejected";
        fn load(&self) -> Result<String, String> {
            if self.broken.load(Ordering::Relaxed) {
                return Err("broken".into());
            }
            std::fs::read_to_string(&self.path).map_err(|e| e.to_string())
        }
        fn files(&self) -> Vec<&Path> {
            vec![&self.path]
        }
        fn loaded(&self, _: &PodName, _: &String, _: Option<&String>) {}
    }

    #[test]
    fn a_bad_reload_keeps_the_last_good_value() {
        let dir = std::env::temp_dir().join(format!("store-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.txt");
        std::fs::write(&path, "one").unwrap();
        let store = Store::load(
            PodName::parse("p").unwrap(),
            Text {
                path: path.clone(),
                broken: AtomicBool::new(false),
            },
        )
        .unwrap();
        std::fs::write(&path, "two").unwrap();
        store.reload();
        assert_eq!(*store.current(), "two");
        store.source().broken.store(true, Ordering::Relaxed);
        store.reload();
        assert_eq!(
            *store.current(),
            "two",
            "the failed reload changed the value"
        );
        assert_eq!(store.reloads_ok.load(Ordering::Relaxed), 1);
        assert_eq!(store.reloads_failed.load(Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
