//! Watching configuration files for changes (identities, policies).
//!
//! The directories are watched, not the files: Kubernetes Secrets, ConfigMaps and
//! cert-manager replace files by renaming or by swapping symlinks, which a watch on the
//! file itself misses. Events are debounced because writers replace related files in
//! separate steps.

use std::{path::Path, sync::Weak, time::Duration};

use notify::{RecursiveMode, Watcher};

const DEBOUNCE: Duration = Duration::from_millis(150);

/// Calls `reload` on `target` after changes to the directories of `files` settle, for as
/// long as both the returned watcher and `target` live.
pub fn watch<T: Send + Sync + 'static>(
    files: &[&Path],
    name: String,
    target: Weak<T>,
    reload: fn(&T),
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
            while rx.recv().is_ok() {
                std::thread::sleep(DEBOUNCE);
                while rx.try_recv().is_ok() {}
                let Some(target) = target.upgrade() else {
                    return;
                };
                reload(&target);
            }
        })
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    Ok(watcher)
}
