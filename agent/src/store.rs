//! One mechanism for everything a pod serves from files that change under it (its identity
//! and its policy): load once, swap atomically on change, keep the last good value when a
//! new one is bad, count both outcomes.
//!
//! Directories are watched, not the files: Kubernetes Secrets, ConfigMaps and cert-manager
//! replace files by renaming or by swapping symlinks, which a watch on the file itself
//! misses. Only events naming one of the source's own files, or the `..data` symlink that
//! a ConfigMap or Secret mount swaps atomically, count: other files in the directory (a log
//! file, an editor's swap file) never cause a reload. Events are debounced because writers
//! replace related files in separate steps, and a watch event whose files read the same
//! bytes as the value in force causes no reload (SIGHUP always reloads).
//! Readers get an `Arc` of the current value without taking a lock (`arc-swap`), so the
//! accept path never waits for a reload.

use std::{
    ffi::OsString,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tracing::{debug, error};

use crate::types::PodName;

const DEBOUNCE: Duration = Duration::from_millis(150);

/// The symlink a Kubernetes ConfigMap or Secret volume swaps (by rename) to publish a new
/// version of every file at once; the files themselves are symlinks through it.
const K8S_DATA_LINK: &str = "..data";

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
    /// What the files held when the value in force was loaded.
    digest: arc_swap::ArcSwapOption<[u8; 32]>,
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
        let digest = digest(&source.files());
        let value = source.load()?;
        source.loaded(&pod, &value, None);
        Ok(Arc::new(Self {
            pod,
            source,
            current: ArcSwap::from_pointee(value),
            digest: arc_swap::ArcSwapOption::new(digest.map(Arc::new)),
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

    /// Loads again (an operator's SIGHUP); on failure the previous value stays in force.
    pub fn reload(&self) {
        let files = self.source.files();
        if files.is_empty() {
            return;
        }
        self.load_again(digest(&files));
    }

    /// Loads again if the files' contents changed (a watch event).
    fn reload_if_changed(&self) {
        let files = self.source.files();
        if files.is_empty() {
            return;
        }
        let digest = digest(&files);
        if digest.is_some() && self.digest.load().as_deref() == digest.as_ref() {
            debug!(pod = %self.pod, kind = S::KIND, "files unchanged: no reload");
            return;
        }
        self.load_again(digest);
    }

    fn load_again(&self, digest: Option<[u8; 32]>) {
        if self.push(self.source.load()) {
            self.digest.store(digest.map(Arc::new));
        }
    }

    /// A store whose first value did not come from `source.load()`: the first update of a
    /// stream (the SPIFFE Workload API), which then [`Store::push`]es the next ones.
    pub fn with_value(pod: PodName, source: S, value: S::Value) -> Arc<Self> {
        source.loaded(&pod, &value, None);
        Arc::new(Self {
            pod,
            source,
            current: ArcSwap::from_pointee(value),
            digest: arc_swap::ArcSwapOption::empty(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        })
    }

    /// Puts a new value in force, or, when it is bad, counts and logs the rejection and
    /// keeps the one in force: the same for a reload from files and an update a stream
    /// pushed. Returns whether it was taken.
    pub fn push(&self, value: Result<S::Value, S::Error>) -> bool {
        match value {
            Ok(value) => {
                self.source.loaded(&self.pod, &value, Some(&self.current()));
                self.current.store(Arc::new(value));
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                error!(pod = %self.pod, kind = S::KIND, error = %e, "{}", S::REJECTED);
                false
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

/// The files' contents, hashed in order (`None` when one cannot be read: the load that
/// follows reports why).
fn digest(files: &[&Path]) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    for f in files {
        let bytes = std::fs::read(f).ok()?;
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Some(h.finalize().into())
}

/// Whether a watch event on the directories names one of `names` (the watched files, and
/// the ConfigMap `..data` link).
fn concerns(event: &notify::Event, names: &[OsString]) -> bool {
    !event.kind.is_access()
        && event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| names.iter().any(|w| w.as_os_str() == n))
        })
}

fn watch_dirs<S: Source>(
    files: &[&Path],
    name: String,
    target: Weak<Store<S>>,
) -> notify::Result<notify::RecommendedWatcher> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut names: Vec<OsString> = files
        .iter()
        .filter_map(|p| p.file_name().map(OsString::from))
        .collect();
    names.push(K8S_DATA_LINK.into());
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok_and(|e| concerns(&e, &names)) {
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
                target.reload_if_changed();
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
        std::fs::write(&path, "three").unwrap();
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

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Long enough for the watcher and the debounce to have acted on anything written.
    fn settle() {
        std::thread::sleep(DEBOUNCE * 4);
    }

    #[test]
    fn only_its_own_file_and_the_configmap_swap_reload() {
        let dir = std::env::temp_dir().join(format!("store-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // The ConfigMap volume layout: v.txt -> ..data/v.txt, ..data -> ..v1.
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::write(dir.join("..v1/v.txt"), "one").unwrap();
        std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/v.txt", dir.join("v.txt")).unwrap();
        let store = Store::load(
            PodName::parse("p").unwrap(),
            Text {
                path: dir.join("v.txt"),
                broken: AtomicBool::new(false),
            },
        )
        .unwrap();
        let _watcher = store.watch().unwrap().expect("a file to watch");
        let reloads = || store.reloads_ok.load(Ordering::Relaxed);

        // Ten writes to other files of the directory (a log file among them): no reload.
        for i in 0..10 {
            std::fs::write(dir.join(format!("other-{i}.log")), format!("line {i}")).unwrap();
        }
        settle();
        assert_eq!(reloads(), 0, "unrelated files caused reloads");

        // The same bytes written again: nothing to reload.
        std::fs::write(dir.join("..v1/v.txt"), "one").unwrap();
        std::fs::write(dir.join("v.txt"), "one").unwrap();
        settle();
        assert_eq!(reloads(), 0, "an unchanged file was reloaded");

        // The kubelet's atomic update: a new version directory, a new link renamed over ..data.
        std::fs::create_dir_all(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v2/v.txt"), "two").unwrap();
        std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        wait_for("the ..data swap to reload", || reloads() == 1);
        assert_eq!(*store.current(), "two");

        // The file itself replaced by rename, as editors and `kubectl cp` do.
        std::fs::write(dir.join("v.tmp"), "three").unwrap();
        std::fs::remove_file(dir.join("v.txt")).unwrap();
        std::fs::rename(dir.join("v.tmp"), dir.join("v.txt")).unwrap();
        wait_for("the renamed file to reload", || reloads() == 2);
        assert_eq!(*store.current(), "three");
        settle();
        assert_eq!(reloads(), 2, "one change reloaded more than once");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
