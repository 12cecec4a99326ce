//! Least privilege: `agent run` keeps only the capabilities its work at runtime needs and
//! drops every other one from all five sets (effective, permitted, inheritable, ambient and
//! the bounding set), before any other thread exists, so every thread of the agent runs
//! with the same small set. What is kept is needed after start, not only to load: pods are
//! enrolled at runtime (the CNI plugin, `agent enroll`), and each one is attached, pinned
//! and served from inside its network namespace. Loading the programs needs nothing more
//! (an init container loads them with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN alone).

use caps::{CapSet, Capability, CapsHashSet};

/// Each capability the agent keeps, and why.
pub const KEPT: [(Capability, &str); 5] = [
    (
        Capability::CAP_BPF,
        "load the programs, update their maps, create and pin links for every pod enrolled",
    ),
    (
        Capability::CAP_NET_ADMIN,
        "attach cgroup/connect, sendmsg, sock_ops and sk_lookup programs; SO_MARK on upstream sockets of iptables pods",
    ),
    (
        Capability::CAP_PERFMON,
        "be verified as a trusted loader: without it (or CAP_SYS_ADMIN) the verifier also checks speculative paths, where 6.1 and 6.12 reject connect4 (6.18 does not)",
    ),
    (
        Capability::CAP_SYS_ADMIN,
        "setns(2) into each pod's network namespace, where its listeners and upstream sockets are made",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "open /proc/PID/ns/net of another user's process (a pod enrolled by its PID)",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot drop capabilities ({0}); run the agent as root, or with at least CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_SETPCAP")]
    Caps(#[from] caps::errors::CapsError),
}

/// What [`drop_to_kept`] did.
#[derive(Debug)]
pub struct Dropped {
    /// The kept capabilities this process actually holds.
    pub held: Vec<String>,
    /// How many capabilities left the permitted set.
    pub dropped: usize,
    /// Whether the bounding set could be narrowed too (needs CAP_SETPCAP).
    pub bounded: bool,
}

fn kept() -> CapsHashSet {
    KEPT.iter().map(|(c, _)| *c).collect()
}

/// Narrows this thread's capabilities (and so those of every thread it creates later) to
/// [`KEPT`]. Must run before the runtime starts its threads.
pub fn drop_to_kept() -> Result<Dropped, PrivilegeError> {
    let kept = kept();
    let permitted = caps::read(None, CapSet::Permitted)?;
    // The bounding set first: narrowing it needs CAP_SETPCAP, which goes next.
    let bounded = permitted.contains(&Capability::CAP_SETPCAP);
    if bounded {
        for cap in caps::read(None, CapSet::Bounding)? {
            if !kept.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let keep: CapsHashSet = permitted.intersection(&kept).copied().collect();
    // Effective must stay within permitted: narrow it first.
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)?;
    let mut held: Vec<String> = keep.iter().map(ToString::to_string).collect();
    held.sort();
    Ok(Dropped {
        held,
        dropped: permitted.len() - keep.len(),
        bounded,
    })
}
