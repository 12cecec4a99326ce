//! `agent run`: load the programs, re-adopt what a previous agent left, enrol the
//! configured pods, serve the admin API (which enrols and releases pods at runtime), and on
//! SIGTERM/SIGINT stop in an order that never leaves a pod less protected than its fail
//! mode promises. The only reader of [`crate::config`].

mod handover;
mod init;
mod node;
mod restore;

pub use init::init;

use std::sync::Arc;

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    admin::Admin,
    cgroup,
    config::Config,
    ebpf::{EbpfError, Kernel},
    proxy::{Settings, Shared},
    state::StateDir,
    telemetry,
};
use node::{Event, Node, NodeSettings};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("pod {pod}: {reason}")]
    Enroll { pod: String, reason: String },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Handover(#[from] handover::HandoverError),
    #[error(transparent)]
    Unsupported(#[from] crate::ebpf::probe::Unsupported),
}

/// How often the agent looks for pods whose network namespace went away.
const REAP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub async fn run(cfg: Config) -> Result<(), RunError> {
    raise_fd_limit();
    let state = StateDir::open(&cfg.state_dir)?;
    // Before anything is loaded: a missing feature is one sentence, not a verifier dump.
    let features = crate::ebpf::probe::probe();
    crate::ebpf::probe::require(&features)?;
    let splice_off = crate::ebpf::probe::splice_missing(&features).map(|f| f.missing());
    match &splice_off {
        None => info!(
            features = features.len(),
            "kernel features probed: every one the agent uses is there"
        ),
        Some(why) => warn!(
            features = features.len(),
            missing = %why,
            "kernel features probed: the splice is unavailable on this kernel, pods asking for acceleration are served without it"
        ),
    }
    let (mut kernel, orig_dst) = Kernel::load(
        telemetry::kernel_log_level(&cfg.log_level),
        &cfg.pin_root,
        splice_off,
    )?;
    kernel.spawn_log_forwarder()?;
    let (own_dir, own_id) = cgroup::own()?;
    kernel.pods.exempt_agent_cgroup(own_id)?;
    info!(cgroup = %own_dir.display(), cgroup_id = own_id, "agent's own sockets are exempt by cgroup");
    for ip in &cfg.probe_sources {
        kernel.pods.add_probe_source(*ip)?;
    }
    for net in &cfg.mesh_networks {
        kernel.pods.add_mesh_network(net)?;
    }
    let known: std::collections::HashMap<_, _> = cfg.workloads.iter().cloned().collect();
    let expected: crate::tls::Expected = Arc::new(known.clone());
    let shared = Shared::new(
        orig_dst,
        Settings {
            connect_timeout: cfg.connect_timeout,
            handshake_timeout: cfg.handshake_timeout,
            detect_timeout: cfg.protocol_detect_timeout,
            http_header_timeout: cfg.http_header_timeout,
            http_max_header_bytes: cfg.http_max_header_bytes,
            mesh_networks: cfg.mesh_networks.clone(),
            known,
            limits: cfg.limits,
            idle_timeout: cfg.idle_timeout,
        },
    );
    let (control_tx, mut control_rx) = mpsc::channel(64);
    let admin = Admin::new(
        shared.clone(),
        features,
        &kernel,
        cfg.pin_root.clone(),
        control_tx,
    );
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut node = Node::new(
        kernel,
        shared.clone(),
        expected,
        NodeSettings {
            outbound_port: cfg.outbound_port,
            inbound_port: cfg.inbound_port,
            pin_root: cfg.pin_root.clone(),
            drain_timeout: cfg.drain_timeout,
            pod_defaults: cfg.pod_defaults.clone(),
            node_mode: cfg.node.clone(),
        },
        state,
        events_tx.clone(),
        admin.clone(),
        own_dir,
    );
    // Hot restart: an agent still running here hands over its listeners first.
    let takeover = handover::request(&cfg.state_dir)?;
    if let Some(t) = &takeover {
        if let Some(fd) = t.orig_dst.as_ref().and_then(|fd| fd.try_clone().ok()) {
            if let Err(e) = shared.orig_dst.adopt_previous(fd) {
                warn!(error = %e, "the previous agent's original-destination map is not usable: its last redirects may be refused");
            }
        }
        info!(
            listeners = t.listeners.len(),
            "taking over from the running agent"
        );
    }
    let takeover = takeover.map(|mut t| {
        node.inherit(std::mem::take(&mut t.listeners));
        t
    });
    if let Err(e) = restore::restore(&mut node, cfg.pods.clone()).await {
        // The cause is reported once, by the caller that exits with it.
        warn!("enrollment failed; releasing the pods enrolled so far");
        finish(node, &cfg, std::time::Duration::ZERO).await;
        return Err(e);
    }
    node.publish();
    admin.serve(&cfg.admin_socket)?;
    if let Some(addr) = cfg.admin_tcp {
        admin.serve_tcp(addr).await?;
    }
    admin
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) = takeover {
        let unused = node.unused_inherited();
        t.ready()?;
        info!(
            pods = node.served_count(),
            unused_listeners = unused,
            "took over from the previous agent: it stops accepting and drains"
        );
    }
    handover::serve(&cfg.state_dir, events_tx.clone())?;
    info!(pods = node.served_count(), outbound_port = cfg.outbound_port,
          inbound_port = cfg.inbound_port, admin_socket = %cfg.admin_socket.display(),
          state_dir = %cfg.state_dir.display(), "agent ready");

    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Signals)?;
    let mut reap = tokio::time::interval(REAP_EVERY);
    let mut handed_over = false;
    loop {
        tokio::select! {
            _ = term.recv() => { info!(signal = "SIGTERM", "signal received"); break }
            _ = int.recv() => { info!(signal = "SIGINT", "signal received"); break }
            _ = hup.recv() => {
                info!(signal = "SIGHUP", "reloading policies and identities");
                node.reload_all();
            }
            Some(c) = control_rx.recv() => node.control(c).await,
            Some(ev) = events.recv() => match ev {
                Event::Addresses { name, gen, addrs } => node.addresses(&name, gen, addrs),
                Event::Drained { name, gen, open, cut } => node.drained(&name, gen, open, cut),
                Event::Handover(reply) => { let _ = reply.send(node.offer()); }
                Event::HandedOver => { handed_over = true; break }
            },
            _ = reap.tick() => node.reap(),
        }
    }
    admin
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    if handed_over {
        // The admin socket, the handover socket, the pins and the state are the new
        // agent's now: nothing of them is removed.
        info!("handed over to a new agent: no new connections here; draining");
        let (counters, metrics) = (node.kernel().counters.clone(), node.metrics());
        node.hand_over(cfg.drain_timeout).await;
        log_counters(&counters, &metrics);
        info!("agent stopped (handed over)");
        return Ok(());
    }
    info!("stopping: no new connections; draining");
    finish(node, &cfg, cfg.drain_timeout).await;
    let _ = std::fs::remove_file(&cfg.admin_socket);
    info!("agent stopped");
    Ok(())
}

/// Stops serving every pod, logs the counters, and unpins the maps when nothing of ours
/// stays in the kernel.
async fn finish(node: Node, cfg: &Config, deadline: std::time::Duration) {
    let counters = node.kernel().counters.clone();
    let metrics = node.metrics();
    node.shutdown(deadline).await;
    log_counters(&counters, &metrics);
    if crate::ebpf::pinned_pods(&cfg.pin_root).is_empty() {
        crate::ebpf::dump::unpin_maps(&cfg.pin_root);
    }
}

fn log_counters(counters: &crate::ebpf::Counters, metrics: &crate::telemetry::metrics::Metrics) {
    let kernel: std::collections::BTreeMap<&str, u64> = counters.snapshot().into_iter().collect();
    info!(counters = %serde_json::to_string(&kernel).unwrap_or_default(), "kernel counters");
    info!(counters = %serde_json::to_string(&metrics.events()).unwrap_or_default(), "proxy counters");
}

/// Every proxied connection costs two descriptors; the usual soft limit of 1024 would cap
/// the agent at ~500 connections.
/// Every proxied connection holds two descriptors (more while it connects): the soft limit
/// a process inherits (often 1024) is far below what a node's pods need, so it is raised to
/// the hard limit, and the result said, since it bounds how many connections can be held.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= hard {
        info!(soft, hard, "open files limit already at the hard limit");
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => info!(
            from = soft,
            to = hard,
            "raised the open files soft limit to the hard limit"
        ),
        Err(e) => {
            warn!(soft, hard, error = %e, "cannot raise the open files soft limit; connections beyond it will be refused")
        }
    }
}
