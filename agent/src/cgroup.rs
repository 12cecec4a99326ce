//! cgroup v2 facts the agent needs: where the hierarchy is mounted (it differs between
//! hosts: `/sys/fs/cgroup` on most nodes, `/sys/fs/cgroup/unified` on hybrid ones) and
//! the id of a cgroup (the inode number of its directory on cgroup2).

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo): the agent needs cgroup v2")]
    NoCgroup2,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent's own cgroup is not listed in /proc/self/cgroup (no `0::` line)")]
    NoOwnCgroup,
}

/// The mount point of the cgroup2 hierarchy, from mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })?;
    parse_cgroup2_mount(&text).ok_or(CgroupError::NoCgroup2)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent maj:min root mountpoint opts [optional...] - fstype source opts
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        let mountpoint = pre.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mountpoint))
    })
}

/// The cgroup v2 id of a cgroup directory.
pub fn id_of(path: &Path) -> Result<u64, CgroupError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Read {
            path: path.into(),
            source,
        })
}

/// The directory and id of the cgroup this process runs in.
pub fn own() -> Result<(PathBuf, u64), CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NoOwnCgroup)?;
    let dir = cgroup2_mount()?.join(rel.trim_start_matches('/'));
    let id = id_of(&dir)?;
    Ok((dir, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid).unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        let unified = "31 25 0:27 / /sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(unified).unwrap(),
            PathBuf::from("/sys/fs/cgroup")
        );
        assert!(parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw\n").is_none());
    }
}
