//! `agent init`: the init container of sidecar mode. It attaches the pod's blocking
//! programs (connect4/6 on the pod's cgroup, sk_lookup on its network namespace), pins
//! them, leaves the pod refusing every connection, and exits; the native sidecar (`agent
//! run --sidecar`) then adopts the pins without a gap. Needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN,
//! nothing more: the pod's namespace is the process's own, so no setns.

use agent_common::POD_FLAG_BLOCK;

use super::{node::kernel_entry, RunError};
use crate::{
    config::Config,
    ebpf::{Attach, Kernel, PodLinks},
    netns::Netns,
    types::PodId,
};

/// Blocks the one pod of `cfg` (validated as for `--sidecar`) and pins what blocks it.
pub fn init(cfg: &Config) -> Result<String, RunError> {
    let [pod] = cfg.pods.as_slice() else {
        unreachable!("the configuration was validated for exactly one pod");
    };
    crate::ebpf::probe::lift_memlock_limit();
    crate::ebpf::probe::require(&crate::ebpf::probe::probe())?;
    // Blocking needs no splice: its programs are not even loaded.
    let (mut kernel, _orig_dst) =
        Kernel::load(0, &cfg.pin_root, Some("not used by agent init".into()))?;
    let netns = Netns::open(&pod.netns)?;
    let cookie = netns.cookie()?;
    let mut entry = kernel_entry(pod, PodId(1), cookie, cfg.outbound_port);
    // Nothing serves the pod yet: every connect is refused (and sk_lookup, finding no
    // address it knows in an enrolled namespace, drops every inbound one).
    entry.config.flags |= POD_FLAG_BLOCK;
    kernel.pods.set_config(cookie, entry.config)?;
    let (links, replaced) = PodLinks::attach(
        &mut kernel,
        &pod.name,
        &pod.cgroup,
        netns.file(),
        Attach {
            pin_root: &cfg.pin_root,
            pin: true,
            redirect: true,
            splice: false,
        },
    )?;
    links.leave_pinned();
    Ok(format!(
        "pod {} is fail-closed: connect4, connect6 and sk_lookup pinned under {}{}; `agent run --sidecar` adopts them",
        pod.name,
        crate::ebpf::pin_dir(&cfg.pin_root, pod.name.as_str()).display(),
        if replaced > 0 { " (replacing an earlier init's)" } else { "" }
    ))
}
