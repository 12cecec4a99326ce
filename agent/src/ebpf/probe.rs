//! What the kernel must offer, probed before anything is loaded: each program type, each
//! map type, and each helper in each program type that calls it (helpers are allowed per
//! program type, and later kernels allowed more of them). A missing one stops the agent with
//! one sentence naming it and the first Linux release that has it, instead of a verifier
//! dump. The probes load tiny programs (aya's, after libbpf's), so they answer for this
//! kernel's configuration, not for its version number.
//!
//! What only the splice needs ([`Need::Splice`]) is optional: without it the splice's
//! programs are not loaded and pods asking for acceleration are served without it (with a
//! warning), so the core path runs on kernels older than the splice's 5.15.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};
use serde::Serialize;

/// Whether the agent can run without a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Need {
    /// The agent stops without it.
    Required,
    /// Only the splice (acceleration) uses it: without it the splice is off.
    Splice,
}

/// One probed feature.
#[derive(Debug, Clone, Serialize)]
pub struct Feature {
    pub name: String,
    /// Which part of the agent uses it.
    pub used_by: &'static str,
    /// The first Linux release that offers it.
    pub since: &'static str,
    pub need: Need,
    pub available: bool,
}

impl Feature {
    /// Why the splice is unavailable, as a clause: "bpf_get_netns_cookie in sock_ops
    /// programs needs Linux 5.15".
    pub fn missing(&self) -> String {
        format!("{} needs Linux {}", self.name, self.since)
    }
}

/// The kernel lacks something the agent cannot do without.
#[derive(Debug, thiserror::Error)]
#[error("this kernel ({release}) cannot run the agent: {feature} (used by {used_by}) needs Linux {since} or later")]
pub struct Unsupported {
    pub release: String,
    pub feature: String,
    pub used_by: &'static str,
    pub since: &'static str,
}

use Need::{Required, Splice};

const PROGRAMS: &[(ProgramType, &str, &str, &str, Need)] = &[
    (
        ProgramType::CgroupSockAddr,
        "cgroup_sock_addr programs",
        "outbound redirect (connect4/6) and UDP (sendmsg4/6)",
        "4.18",
        Required,
    ),
    (
        ProgramType::SockOps,
        "sock_ops programs",
        "original destinations (record_orig_dst) and the splice (splice_track)",
        "4.13",
        Required,
    ),
    (
        ProgramType::SkLookup,
        "sk_lookup programs",
        "inbound interception",
        "5.9",
        Required,
    ),
    (
        ProgramType::SkMsg,
        "sk_msg programs",
        "the splice (splice_msg)",
        "4.17",
        Splice,
    ),
];

const MAPS: &[(MapType, &str, &str)] = &[
    (MapType::Hash, "hash maps", "3.19"),
    (MapType::LruHash, "LRU hash maps", "4.10"),
    (MapType::LpmTrie, "LPM trie maps", "4.11"),
    (MapType::PerCpuArray, "per-CPU array maps", "4.6"),
    (MapType::SockMap, "SOCKMAP maps", "4.14"),
    // The object creates every map at load, the splice's SPLICE included.
    (MapType::SockHash, "SOCKHASH maps", "4.18"),
    (MapType::RingBuf, "ring buffer maps", "5.8"),
];

/// Each helper in the program type that calls it, what for, and whether the agent can do
/// without it.
const HELPERS: &[(ProgramType, BpfHelper, &str, &str, &str, Need)] = &[
    (
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie",
        "connect4/6 and sendmsg4/6",
        "5.7",
        Required,
    ),
    (
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_get_current_cgroup_id,
        "bpf_get_current_cgroup_id",
        "connect4/6 (the agent's own sockets)",
        "5.7",
        Required,
    ),
    (
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_get_socket_cookie,
        "bpf_get_socket_cookie",
        "connect4/6",
        "5.7",
        Required,
    ),
    (
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_ringbuf_output,
        "bpf_ringbuf_output",
        "the programs' logs",
        "5.8",
        Required,
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_socket_cookie,
        "bpf_get_socket_cookie",
        "record_orig_dst (original destinations)",
        "5.7",
        Required,
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie",
        "splice_track (the splice)",
        "5.15",
        Splice,
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_sock_hash_update,
        "bpf_sock_hash_update",
        "splice_track (the splice)",
        "4.18",
        Splice,
    ),
    (
        ProgramType::SkLookup,
        BpfHelper::BPF_FUNC_sk_assign,
        "bpf_sk_assign",
        "steer_inbound (inbound interception)",
        "5.9",
        Required,
    ),
    (
        ProgramType::SkMsg,
        BpfHelper::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie",
        "splice_msg (the splice)",
        "5.15",
        Splice,
    ),
    (
        ProgramType::SkMsg,
        BpfHelper::BPF_FUNC_msg_redirect_hash,
        "bpf_msg_redirect_hash",
        "splice_msg (the splice)",
        "4.18",
        Splice,
    ),
];

fn type_name(t: ProgramType) -> &'static str {
    match t {
        ProgramType::CgroupSockAddr => "cgroup_sock_addr",
        ProgramType::SockOps => "sock_ops",
        ProgramType::SkLookup => "sk_lookup",
        ProgramType::SkMsg => "sk_msg",
        _ => "other",
    }
}

/// Lets BPF maps be created on kernels before 5.11, which charge them to RLIMIT_MEMLOCK
/// (the agent's maps would fail with EPERM). Later kernels charge the memory cgroup and
/// ignore the limit, so a refusal to raise it (no CAP_SYS_RESOURCE) is only logged. Call it
/// before capabilities are dropped and before [`probe`].
pub fn lift_memlock_limit() {
    use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!(error = %e, "RLIMIT_MEMLOCK kept (kernels from 5.11 on do not apply it to BPF)");
    }
}

/// Probes every feature. A probe that cannot decide counts as missing.
pub fn probe() -> Vec<Feature> {
    let mut out = Vec::new();
    out.push(Feature {
        name: "BTF (/sys/kernel/btf/vmlinux)".into(),
        used_by: "loading the programs",
        since: "5.4",
        need: Required,
        available: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
    });
    out.push(Feature {
        name: "SO_NETNS_COOKIE socket option".into(),
        used_by: "keying pods by network namespace (their cookies)",
        since: "5.14",
        need: Required,
        available: socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
            .and_then(|s| crate::netns::socket_netns_cookie(&s))
            .is_ok(),
    });
    for (t, name, used_by, since, need) in PROGRAMS {
        out.push(Feature {
            name: (*name).into(),
            used_by,
            since,
            need: *need,
            available: is_program_supported(*t).unwrap_or(false),
        });
    }
    for (t, name, since) in MAPS {
        out.push(Feature {
            name: (*name).into(),
            used_by: "the programs' state",
            since,
            need: Required,
            available: is_map_supported(*t).unwrap_or(false),
        });
    }
    for (t, helper, name, used_by, since, need) in HELPERS {
        out.push(Feature {
            name: format!("{name} in {} programs", type_name(*t)),
            used_by,
            since,
            need: *need,
            available: is_helper_supported(*t, *helper).unwrap_or(false),
        });
    }
    out
}

/// The first missing feature the splice needs: `None` when the splice can be loaded.
pub fn splice_missing(features: &[Feature]) -> Option<&Feature> {
    features.iter().find(|f| f.need == Splice && !f.available)
}

/// The first missing required feature, as the sentence the agent stops with.
pub fn require(features: &[Feature]) -> Result<(), Unsupported> {
    let Some(missing) = features.iter().find(|f| f.need == Required && !f.available) else {
        return Ok(());
    };
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown release".into());
    Err(Unsupported {
        release,
        feature: missing.name.clone(),
        used_by: missing.used_by,
        since: missing.since,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_feature_is_one_sentence_naming_it_and_the_release_that_has_it() {
        let features = vec![
            Feature {
                name: "sk_lookup programs".into(),
                used_by: "inbound interception",
                since: "5.9",
                need: Required,
                available: true,
            },
            Feature {
                name: "bpf_sk_assign in sk_lookup programs".into(),
                used_by: "steer_inbound (inbound interception)",
                since: "5.9",
                need: Required,
                available: false,
            },
        ];
        let e = require(&features).unwrap_err().to_string();
        assert!(
            e.contains("bpf_sk_assign in sk_lookup programs (used by steer_inbound (inbound interception)) needs Linux 5.9 or later"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(require(&features[..1]).is_ok());
    }

    #[test]
    fn what_only_the_splice_needs_turns_the_splice_off_instead_of_stopping_the_agent() {
        let features = vec![Feature {
            name: "bpf_get_netns_cookie in sock_ops programs".into(),
            used_by: "splice_track (the splice)",
            since: "5.15",
            need: Splice,
            available: false,
        }];
        assert!(require(&features).is_ok());
        let missing = splice_missing(&features).expect("the splice is off");
        assert_eq!(
            missing.missing(),
            "bpf_get_netns_cookie in sock_ops programs needs Linux 5.15"
        );
    }
}
