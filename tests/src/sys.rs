//! Small system helpers: running commands, finding cgroup v2, root checks.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Runs a command and panics with its output if it fails.
pub(crate) fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e} (is it installed? `cargo xtask setup`)"));
    if !out.status.success() {
        panic!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, ignoring failure (teardown of things that may already be gone).
pub(crate) fn run_quiet(cmd: &str, args: &[&str]) {
    let _ = Command::new(cmd).args(args).output();
}

/// The cgroup v2 mount point, from mountinfo (not assumed: hybrid hosts differ).
pub fn cgroup2_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mountpoint = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mountpoint))
        })
        .expect("no cgroup2 mount in /proc/self/mountinfo: the simulated node needs cgroup v2")
}

/// Privileged tests need root. Outside CI a non-root run skips them loudly; under CI=true
/// a skip would be a silent hole in the suite, so it fails instead.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test}: privileged test needs root and CI=true forbids skipping it");
    }
    eprintln!("SKIPPED {test}: needs root (run `cargo xtask test` as root)");
    false
}

/// Programs attached to a cgroup, as `(attach_type, name)`, read with bpftool.
pub fn attached_programs(cgroup: &Path) -> Vec<(String, String)> {
    let out = run(
        "bpftool",
        &["-j", "cgroup", "show", &cgroup.to_string_lossy()],
    );
    if out.trim().is_empty() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool JSON");
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["attach_type"].as_str().unwrap_or("?").to_string(),
                        p["name"].as_str().unwrap_or("?").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How many BPF links are attached to the network namespace at `netns` (sk_lookup).
pub fn netns_links(netns: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(netns)
        .unwrap_or_else(|e| panic!("stat {}: {e}", netns.display()))
        .ino();
    netns_links_by_ino(ino)
}

/// How many BPF links are attached to the network namespace with this inode (which may
/// have no path any more).
pub fn netns_links_by_ino(ino: u64) -> usize {
    let out = run("bpftool", &["-j", "link", "show"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool JSON");
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|l| l["type"] == "netns" && l["netns_ino"].as_u64() == Some(ino))
                .count()
        })
        .unwrap_or(0)
}

/// A short id unique to this process and moment, for interface and namespace names
/// (interface names are limited to 15 bytes).
pub(crate) fn run_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = std::process::id()
        .wrapping_mul(2654435761)
        .wrapping_add(nanos)
        .wrapping_add(SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(40503));
    format!("{:05x}", mix & 0xfffff)
}

/// Every cgroup hierarchy mounted here (v2, and the v1 controllers of hybrid hosts).
pub(crate) fn cgroup_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mountpoint = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mountpoint))
        })
        .collect()
}

/// Removes an empty cgroup directory tree, deepest first (the v1 hierarchies of a
/// container runtime's pods, whose processes are already gone).
pub(crate) fn remove_cgroup_dirs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_dirs(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}
