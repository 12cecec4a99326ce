//! What the kernel must offer, probed before anything is loaded: each program type, each
//! map type, and each helper in each program type that calls it (helpers are allowed per
//! program type, and later kernels allowed more of them). A missing one stops the agent with
//! one sentence naming it and the first Linux release that has it, instead of a verifier
//! dump. The probes load tiny programs (aya's, after libbpf's), so they answer for this
//! kernel's configuration, not for its version number.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};
use serde::Serialize;

/// One probed feature.
#[derive(Debug, Clone, Serialize)]
pub struct Feature {
    pub name: String,
    /// Which part of the agent uses it.
    pub used_by: &'static str,
    /// The first Linux release that offers it.
    pub since: &'static str,
    pub available: bool,
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

const PROGRAMS: &[(ProgramType, &str, &str, &str)] = &[
    (
        ProgramType::CgroupSockAddr,
        "cgroup_sock_addr programs",
        "outbound redirect (connect4/6) and UDP (sendmsg4/6)",
        "4.18",
    ),
    (
        ProgramType::SockOps,
        "sock_ops programs",
        "original destinations and the splice",
        "4.13",
    ),
    (
        ProgramType::SkLookup,
        "sk_lookup programs",
        "inbound interception",
        "5.9",
    ),
    (ProgramType::SkMsg, "sk_msg programs", "the splice", "4.17"),
];

const MAPS: &[(MapType, &str, &str)] = &[
    (MapType::Hash, "hash maps", "3.19"),
    (MapType::LruHash, "LRU hash maps", "4.10"),
    (MapType::LpmTrie, "LPM trie maps", "4.11"),
    (MapType::PerCpuArray, "per-CPU array maps", "4.6"),
    (MapType::SockMap, "SOCKMAP maps", "4.14"),
    (MapType::SockHash, "SOCKHASH maps", "4.18"),
    (MapType::RingBuf, "ring buffer maps", "5.8"),
];

/// Each helper in the program type that calls it, and what for.
const HELPERS: &[(ProgramType, BpfHelper, &str, &str, &str)] = &[
    (
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie",
        "connect4/6 and sendmsg4/6",
        "5.7",
    ),
    (
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_get_current_cgroup_id,
        "bpf_get_current_cgroup_id",
        "connect4/6 (the agent's own sockets)",
        "5.7",
    ),
    (
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_get_socket_cookie,
        "bpf_get_socket_cookie",
        "connect4/6",
        "5.7",
    ),
    (
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_ringbuf_output,
        "bpf_ringbuf_output",
        "the programs' logs",
        "5.8",
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_socket_cookie,
        "bpf_get_socket_cookie",
        "sock_ops",
        "5.7",
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie",
        "sock_ops (the splice)",
        "5.15",
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_sock_hash_update,
        "bpf_sock_hash_update",
        "sock_ops (the splice)",
        "4.18",
    ),
    (
        ProgramType::SkLookup,
        BpfHelper::BPF_FUNC_sk_assign,
        "bpf_sk_assign",
        "sk_lookup",
        "5.9",
    ),
    (
        ProgramType::SkMsg,
        BpfHelper::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie",
        "sk_msg (the splice)",
        "5.15",
    ),
    (
        ProgramType::SkMsg,
        BpfHelper::BPF_FUNC_msg_redirect_hash,
        "bpf_msg_redirect_hash",
        "sk_msg (the splice)",
        "4.18",
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

/// Probes every feature. A probe that cannot decide counts as missing.
pub fn probe() -> Vec<Feature> {
    let mut out = Vec::new();
    out.push(Feature {
        name: "BTF (/sys/kernel/btf/vmlinux)".into(),
        used_by: "loading the programs",
        since: "5.4",
        available: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
    });
    for (t, name, used_by, since) in PROGRAMS {
        out.push(Feature {
            name: (*name).into(),
            used_by,
            since,
            available: is_program_supported(*t).unwrap_or(false),
        });
    }
    for (t, name, since) in MAPS {
        out.push(Feature {
            name: (*name).into(),
            used_by: "the programs' state",
            since,
            available: is_map_supported(*t).unwrap_or(false),
        });
    }
    for (t, helper, name, used_by, since) in HELPERS {
        out.push(Feature {
            name: format!("{name} in {} programs", type_name(*t)),
            used_by,
            since,
            available: is_helper_supported(*t, *helper).unwrap_or(false),
        });
    }
    out
}

/// The first missing feature, as the sentence the agent stops with.
pub fn require(features: &[Feature]) -> Result<(), Unsupported> {
    let Some(missing) = features.iter().find(|f| !f.available) else {
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
                available: true,
            },
            Feature {
                name: "bpf_get_netns_cookie in sock_ops programs".into(),
                used_by: "sock_ops (the splice)",
                since: "5.15",
                available: false,
            },
        ];
        let e = require(&features).unwrap_err().to_string();
        assert!(
            e.contains("bpf_get_netns_cookie in sock_ops programs (used by sock_ops (the splice)) needs Linux 5.15 or later"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(require(&features[..1]).is_ok());
    }
}
