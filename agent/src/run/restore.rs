//! Starting over from what a previous agent left: its state records and its pins.
//!
//! Every recorded pod whose namespace still exists is enrolled again, adopting its pinned
//! programs without a gap; the rest are forgotten and their pins removed. A pod the agent
//! cannot prove anything about (an unreadable record, pins with no record) is left exactly
//! as the kernel has it: a fail-closed pod's pins keep refusing its connections, and the
//! admin view and the log say so and what to do.

use std::collections::HashSet;

use tracing::{error, info, warn};

use super::{
    node::{Blocked, Node, Source},
    RunError,
};
use crate::{
    spec::{PodSpec, System},
    state::{Origin, Record, Status},
    types::FailMode,
};

pub(super) async fn restore(node: &mut Node, config_pods: Vec<PodSpec>) -> Result<(), RunError> {
    let (records, unreadable) = node.state().read_all();
    for u in unreadable {
        error!(path = %u.path.display(), reason = %u.reason, pod = %u.name,
               "state file unreadable: the pod is left as the kernel has it (its pins, if any, keep it blocked); enrol it again, or run `agent uninstall --pod {}`", u.name);
        node.blocked.insert(
            u.name.clone(),
            Blocked::unknown(format!(
                "state file {} unreadable: {}",
                u.path.display(),
                u.reason
            )),
        );
    }
    let config_names: HashSet<String> = config_pods.iter().map(|p| p.name.to_string()).collect();
    for spec in config_pods {
        let want = records
            .iter()
            .find(|r| r.request.name == spec.name.as_str())
            .map(|r| r.pod_id);
        let pod = spec.name.to_string();
        node.blocked.remove(&pod);
        node.enroll_as(spec, Source::Config, want)
            .await
            .map_err(|e| RunError::Enroll {
                pod,
                reason: e.to_string(),
            })?;
    }
    for r in records {
        let name = r.request.name.clone();
        if config_names.contains(&name) {
            continue;
        }
        if !r.netns_exists() {
            info!(pod = %name, netns = %r.request.netns.display(),
                  "a recorded pod's network namespace is gone: forgetting it and its pins");
            forget(node, &name);
            continue;
        }
        match (r.origin, r.status) {
            (_, Status::Blocked) => {
                block(node, r, "released (fail-closed) by a previous agent".into())
            }
            (Origin::Config, Status::Enrolled) => {
                // Removed from the config file since: released, as its fail mode says.
                info!(pod = %name, "a pod of the previous config is no longer configured: released");
                if r.request.fail_mode == FailMode::Closed {
                    block(node, r, "no longer in the config file (fail-closed)".into());
                } else {
                    forget(node, &name);
                }
            }
            (Origin::Api, Status::Enrolled) => readopt(node, r).await,
        }
    }
    for name in crate::ebpf::pinned_pods(node.pin_root()) {
        if !node.is_known(&name) && crate::ebpf::pins_are_stale(node.pin_root(), &name) {
            info!(pod = %name, "stale pins of a pod that is gone (its cgroup and network namespace no longer exist): removed");
            if let Err(e) = crate::ebpf::uninstall(node.pin_root(), Some(&name)) {
                error!(pod = %name, error = %e, "cannot remove the stale pins");
            }
            continue;
        }
        if !node.is_known(&name) {
            warn!(pod = %name, pin_root = %node.pin_root().display(),
                  "pins of a pod with no record: left blocking; enrol it again, or run `agent uninstall --pod {name}`");
            node.blocked.insert(
                name,
                Blocked::unknown("left pinned by a previous agent, with no record of it"),
            );
        }
    }
    Ok(())
}

/// Enrols a recorded runtime pod again; if that fails, a fail-closed one stays blocked.
async fn readopt(node: &mut Node, r: Record) {
    let name = r.request.name.clone();
    let result = match r.request.validate("", node.defaults(), &System) {
        Ok(spec) => node
            .enroll_as(spec, Source::State, Some(r.pod_id))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(_) => info!(pod = %name, "re-adopted a pod enrolled before the restart"),
        Err(reason) if r.request.fail_mode == FailMode::Closed => {
            error!(pod = %name, error = %reason,
                   "cannot re-adopt the pod; it stays blocked (fail-closed) until it is enrolled again");
            block(node, r, format!("not re-adopted after a restart: {reason}"));
        }
        Err(reason) => {
            error!(pod = %name, error = %reason,
                   "cannot re-adopt the pod (fail-open): it is no longer mediated; enrol it again");
            node.state().remove(&name);
        }
    }
}

fn block(node: &mut Node, mut r: Record, note: String) {
    let name = r.request.name.clone();
    r.status = Status::Blocked;
    if let Err(e) = node.state().write(&name, &r) {
        error!(pod = %name, error = %e, "cannot record the pod as blocked");
    }
    node.blocked.insert(
        name,
        Blocked {
            id: Some(r.pod_id),
            netns: Some((r.request.netns.clone(), (r.netns_dev, r.netns_ino))),
            cgroup: Some(r.request.cgroup.clone()),
            record: Some(r),
            entry: None,
            note,
        },
    );
}

fn forget(node: &mut Node, name: &str) {
    node.remove_blocked(name, Blocked::unknown(""));
}
