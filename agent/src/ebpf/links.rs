//! Attaching the programs to a pod's cgroup, and what stays in the kernel afterwards.
//!
//! Links are owned by [`PodLinks`]. A BPF link that is not pinned detaches when its last
//! file descriptor closes, so for a fail-open pod dropping `PodLinks` is the whole
//! clean-up. A fail-closed pod must keep blocking even after the agent is SIGKILLed, so the
//! links that block (connect4/6 on its cgroup, sk_lookup on its netns) are pinned under
//! `<pin_root>/<pod>/` from the moment they are attached; they (and the maps their programs
//! hold) outlive the agent until an agent adopts the pod again or `agent uninstall` removes
//! the pins. Without the agent, connect4/6 refuse (or redirect to a closed port) and
//! sk_lookup finds no listener in its SOCKMAP and drops.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use agent_common::{
    PROG_CONNECT4, PROG_CONNECT6, PROG_SENDMSG4, PROG_SENDMSG6, PROG_SK_LOOKUP, PROG_SOCK_OPS,
    PROG_SPLICE_TRACK,
};
use aya::programs::{
    links::{FdLink, PinnedLink},
    CgroupAttachMode,
};
use tracing::{info, warn};

use super::{io_err, EbpfError, Kernel};
use crate::types::PodName;

/// With BPF links (kernel >= 5.7, which aya uses) the kernel always attaches in
/// multi-program mode and rejects explicit flags, so `Single` here means "no flags": our
/// programs run alongside other tools' (e.g. Cilium's) and alongside a previous agent's.
const ATTACH: CgroupAttachMode = CgroupAttachMode::Single;

enum Held {
    /// Detaches when dropped (its fd is the link's last reference).
    Owned { _link: FdLink },
    /// Stays attached while the pin exists.
    Pinned(PinnedLink),
}

/// The links of one pod: on its cgroup and on its network namespace.
pub struct PodLinks {
    dir: PathBuf,
    /// connect4, connect6, sk_lookup: what keeps a fail-closed pod closed.
    blocking: Vec<Held>,
    /// record_orig_dst, and splice_track for an accelerated pod.
    sock_ops: Vec<FdLink>,
}

impl PodLinks {
    /// Attaches connect4, connect6, sendmsg4/6 and record_orig_dst to `cgroup` (unless
    /// `redirect` is off: an iptables rule does the pod's outbound redirect), splice_track
    /// too with `splice`, and sk_lookup to `netns`. With
    /// `pin`, the blocking links are pinned under `pin_root/pod`. Links a previous agent
    /// left pinned for this pod are replaced without a gap: the old ones stay attached
    /// until the new ones are (in between, both run and the old ones may refuse: that
    /// errs on the closed side). Returns the links and how many old links were replaced.
    pub fn attach(
        kernel: &mut Kernel,
        pod: &PodName,
        cgroup: &Path,
        netns: &File,
        what: Attach<'_>,
    ) -> Result<(Self, usize), EbpfError> {
        let (pin_root, pin) = (what.pin_root, what.pin);
        let dir = pin_dir(pin_root, pod.as_str());
        let old = take_pins(&dir)?;
        let mut blocking = Vec::new();
        let result = attach_all(kernel, &dir, cgroup, netns, what, &mut blocking);
        let sock_ops = match result {
            Ok(sock_ops) => sock_ops,
            Err(e) => {
                // Nothing half-done stays: the new links go, and the previous agent's
                // links are pinned again, so a pod it kept closed stays closed.
                for held in blocking.drain(..) {
                    if let Held::Pinned(p) = held {
                        let _ = p.unpin();
                    }
                }
                for (path, link) in old {
                    if let Err(pe) = link.pin(&path) {
                        warn!(path = %path.display(), error = %pe, "cannot re-pin a previous agent's link");
                    }
                }
                if !pin {
                    remove_dir_if_empty(&dir);
                }
                return Err(e);
            }
        };
        let replaced = old.len();
        // Only now do the previous agent's links go: the new ones already mediate.
        drop(old);
        if !pin {
            remove_dir_if_empty(&dir);
        }
        Ok((
            Self {
                dir,
                blocking,
                sock_ops,
            },
            replaced,
        ))
    }

    /// No links (what is left once they were detached or left pinned).
    pub fn none() -> Self {
        Self {
            dir: PathBuf::new(),
            blocking: Vec::new(),
            sock_ops: Vec::new(),
        }
    }

    /// Detaches everything, pinned or not.
    pub fn detach(mut self) {
        self.sock_ops.clear();
        for held in self.blocking.drain(..) {
            if let Held::Pinned(p) = held {
                if let Err(e) = p.unpin() {
                    warn!(dir = %self.dir.display(), error = %e, "cannot remove a pin");
                }
            }
        }
        remove_dir_if_empty(&self.dir);
    }

    /// Closes this agent's handles without touching any pin: after a hot restart the new
    /// agent has replaced the pinned links (the pins at these paths are its own), so the
    /// old links detach as their last descriptor, this one, closes.
    pub fn hand_over(mut self) {
        self.sock_ops.clear();
        self.blocking.clear();
    }

    /// Leaves the pinned links in the kernel (the pod stays blocked) and detaches the rest.
    pub fn leave_pinned(mut self) {
        self.sock_ops.clear();
        let pinned = self
            .blocking
            .drain(..)
            .filter(|h| matches!(h, Held::Pinned(_)))
            .count();
        info!(dir = %self.dir.display(), pinned, "left pinned links in place");
    }
}

/// What to attach for a pod, and whether to pin it.
pub struct Attach<'a> {
    pub pin_root: &'a Path,
    /// Pin the blocking links (a fail-closed pod).
    pub pin: bool,
    /// eBPF redirect (connect4/6, sendmsg4/6, record_orig_dst); off for iptables pods.
    pub redirect: bool,
    /// splice_track (an accelerated pod on a kernel that runs the splice).
    pub splice: bool,
}

/// Attaches every link of a pod into `blocking` (so the caller can undo them on error) and
/// returns the sock_ops links.
fn attach_all(
    kernel: &mut Kernel,
    dir: &Path,
    cgroup: &Path,
    netns: &File,
    what: Attach<'_>,
    blocking: &mut Vec<Held>,
) -> Result<Vec<FdLink>, EbpfError> {
    let Attach {
        pin_root,
        pin,
        redirect,
        splice,
    } = what;
    let cgroup_fd = File::open(cgroup).map_err(io_err(cgroup))?;
    if pin {
        ensure_bpffs(pin_root)?;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let hold = |name: &str, link: FdLink| -> Result<Held, EbpfError> {
        if !pin {
            return Ok(Held::Owned { _link: link });
        }
        let path = dir.join(name);
        link.pin(&path)
            .map(Held::Pinned)
            .map_err(|source| EbpfError::Pin { path, source })
    };
    let connect: &[&'static str] = if redirect {
        &[PROG_CONNECT4, PROG_CONNECT6, PROG_SENDMSG4, PROG_SENDMSG6]
    } else {
        &[]
    };
    for &name in connect {
        let prog = kernel.connect_program(name)?;
        let id = prog
            .attach(&cgroup_fd, ATTACH)
            .map_err(|source| EbpfError::Program { name, source })?;
        let link = prog
            .take_link(id)
            .map_err(|source| EbpfError::Program { name, source })?;
        blocking.push(hold(name, FdLink::try_from(link)?)?);
    }
    let prog = kernel.sk_lookup_program()?;
    let program_err = |source| EbpfError::Program {
        name: PROG_SK_LOOKUP,
        source,
    };
    let id = prog.attach(netns).map_err(program_err)?;
    let link = prog.take_link(id).map_err(program_err)?;
    blocking.push(hold(PROG_SK_LOOKUP, FdLink::from(link))?);
    let mut sock_ops = Vec::new();
    if redirect {
        let prog = kernel.sock_ops_program()?;
        sock_ops.push(attach_sock_ops(prog, PROG_SOCK_OPS, &cgroup_fd)?);
    }
    if splice {
        if let Some(link) = attach_splice_track(kernel, &cgroup_fd) {
            sock_ops.push(link?);
        }
    }
    Ok(sock_ops)
}

/// A sock_ops program on a cgroup, owned (a pod without it is not redirected by eBPF or
/// not spliced, so nothing depends on it outliving the agent).
fn attach_sock_ops(
    prog: &mut aya::programs::SockOps,
    name: &'static str,
    cgroup: &File,
) -> Result<FdLink, EbpfError> {
    let err = |source| EbpfError::Program { name, source };
    let id = prog.attach(cgroup, ATTACH).map_err(err)?;
    let link = prog.take_link(id).map_err(err)?;
    Ok(FdLink::try_from(link)?)
}

/// splice_track on a cgroup, or `None` when the splice is off on this kernel.
pub fn attach_splice_track(
    kernel: &mut Kernel,
    cgroup: &File,
) -> Option<Result<FdLink, EbpfError>> {
    let prog = match kernel.splice_track_program()? {
        Ok(p) => p,
        Err(e) => return Some(Err(e)),
    };
    Some(attach_sock_ops(prog, PROG_SPLICE_TRACK, cgroup))
}

/// Unpins every link pinned under `dir`, keeping them attached as owned links (with the
/// paths they were pinned at).
fn take_pins(dir: &Path) -> Result<Vec<(PathBuf, FdLink)>, EbpfError> {
    let mut links = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(links),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io_err(dir))?.path();
        let pinned = PinnedLink::from_pin(&path)?;
        let link = pinned.unpin().map_err(io_err(&path))?;
        links.push((path, link));
    }
    Ok(links)
}

fn remove_dir_if_empty(dir: &Path) {
    // Fails harmlessly when the directory is absent or still holds pins.
    let _ = std::fs::remove_dir(dir);
}

/// Removes every pin under `pin_root` (or only `pod`'s), detaching the links. Returns the
/// pods whose pins were removed. Idempotent.
pub fn uninstall(pin_root: &Path, pod: Option<&str>) -> Result<Vec<String>, EbpfError> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(pin_root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io_err(pin_root)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(pin_root))?;
        let name = pod_of_pin_dir(&entry.file_name().to_string_lossy());
        if name == crate::types::PIN_MAPS_DIR {
            if pod.is_none() {
                super::dump::unpin_maps(pin_root);
            }
            continue;
        }
        if pod.is_some_and(|p| p != name) {
            continue;
        }
        let links = take_pins(&entry.path())?;
        drop(links);
        std::fs::remove_dir(entry.path()).map_err(io_err(entry.path()))?;
        removed.push(name);
    }
    remove_dir_if_empty(pin_root);
    Ok(removed)
}

/// Makes sure `pin_root` can hold pins: its nearest existing ancestor must be on bpffs.
/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there yet (as bpftool does).
pub(super) fn ensure_bpffs(pin_root: &Path) -> Result<(), EbpfError> {
    let mut probe = pin_root;
    while !probe.exists() {
        probe = probe.parent().ok_or_else(|| {
            EbpfError::Bpffs(format!("{} has no existing parent", pin_root.display()))
        })?;
    }
    let on_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    if on_bpffs(probe) {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if pin_root.starts_with(default) && default.is_dir() {
        nix::mount::mount(
            Some("bpf"),
            default,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| EbpfError::Bpffs(format!("cannot mount bpffs on /sys/fs/bpf: {e}")))?;
        if on_bpffs(probe) || on_bpffs(default) {
            return Ok(());
        }
    }
    Err(EbpfError::Bpffs(format!(
        "pin_root {} is not on a bpf filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`) or \
         choose a pin_root under it",
        pin_root.display()
    )))
}

/// The pods that have pins under `pin_root` (fail-closed pods a previous or this agent
/// left blocking).
pub fn pinned_pods(pin_root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(pin_root) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| pod_of_pin_dir(&e.file_name().to_string_lossy()))
        .filter(|n| n != crate::types::PIN_MAPS_DIR)
        .collect();
    names.sort();
    names
}

/// bpffs refuses names with a dot, which pod names may have (`shop.web`): in a pin
/// directory's name a dot is written `~`, which no pod name contains.
pub fn pin_dir(pin_root: &Path, pod: &str) -> PathBuf {
    pin_root.join(pod.replace('.', "~"))
}

fn pod_of_pin_dir(dir: &str) -> String {
    dir.replace('~', ".")
}

/// Whether every link pinned under the pod's directory has lost what it was attached to
/// (its cgroup and its network namespace are gone): the pod no longer exists, and its
/// pins protect nothing. A link's target is read from its fdinfo (`cgroup_id`,
/// `netns_ino`; the kernel reports 0 once the target is gone).
pub fn pins_are_stale(pin_root: &Path, pod: &str) -> bool {
    let dir = pin_dir(pin_root, pod);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return false;
    };
    let mut any = false;
    for path in entries.flatten().map(|e| e.path()) {
        let Ok(pinned) = PinnedLink::from_pin(&path) else {
            return false;
        };
        let link = FdLink::from(pinned);
        let Ok(info) = link.info() else { return false };
        match link_target(info.id()) {
            Some(0) => any = true,
            // Still attached to something that exists, or unreadable: not stale.
            _ => return false,
        }
    }
    any
}

/// The cgroup id or netns inode a link of ours (open in this process) is attached to,
/// from /proc/self/fdinfo of the descriptor whose `link_id` is `id`.
fn link_target(id: u32) -> Option<u64> {
    for e in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        // `anon_inode:bpf-link` (older kernels wrote `bpf_link`).
        let is_link = std::fs::read_link(e.path()).is_ok_and(|t| {
            let t = t.to_string_lossy();
            t == "anon_inode:bpf-link" || t == "anon_inode:bpf_link"
        });
        if !is_link {
            continue;
        }
        let info = std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(e.file_name()))
            .unwrap_or_default();
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if field("link_id:") != Some(u64::from(id)) {
            continue;
        }
        return field("cgroup_id:").or_else(|| field("netns_ino:"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_dirs_have_no_dots_and_map_back() {
        let d = pin_dir(Path::new("/sys/fs/bpf/agent"), "shop.web-1");
        assert_eq!(d, PathBuf::from("/sys/fs/bpf/agent/shop~web-1"));
        assert_eq!(pod_of_pin_dir("shop~web-1"), "shop.web-1");
    }
}
