//! `agent run`: enroll the configured pods, serve them, and on SIGTERM/SIGINT stop in an
//! order that never leaves a pod less protected than its fail mode promises.

use std::{sync::Arc, time::Duration};

use agent_common::{
    PodConfig as KernelPod, POD_FLAG_ACCELERATE, POD_FLAG_BLOCK, POD_FLAG_FAIL_OPEN,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    cgroup,
    config::{Config, FailMode, PodConfig, Redirect},
    ebpf::{EbpfError, Kernel, PodEntry, PodLinks},
    identity::IdentityStore,
    netns::Netns,
    proxy::{self, Direction, Pod, PodTls, ProxyError, Shared},
    telemetry,
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("pod {pod}: identity: {source}")]
    Identity {
        pod: crate::config::PodName,
        source: crate::identity::IdentityError,
    },
    #[error("pod {pod}: {source}")]
    Policy {
        pod: crate::config::PodName,
        source: crate::authz::PolicyError,
    },
    #[error("pod {pod}: cannot watch the identity or policy files: {source}")]
    Watch {
        pod: crate::config::PodName,
        source: notify::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// One enrolled pod and everything the agent holds for it.
struct Enrolled {
    spec: PodConfig,
    entry: PodEntry,
    links: PodLinks,
    /// Keep the identity and policy files watched while the pod is enrolled.
    _watchers: Vec<notify::RecommendedWatcher>,
    pod: Arc<Pod>,
}

pub async fn run(cfg: Config) -> Result<(), RunError> {
    raise_fd_limit();
    let (mut kernel, orig_dst) =
        Kernel::load(telemetry::kernel_log_level(&cfg.log_level), &cfg.pin_root)?;
    kernel.spawn_log_forwarder()?;
    let (own_dir, own_id) = cgroup::own()?;
    kernel.pods.exempt_agent_cgroup(own_id)?;
    info!(cgroup = %own_dir.display(), cgroup_id = own_id, "agent's own sockets are exempt by cgroup");
    for ip in &cfg.probe_sources {
        kernel.pods.add_probe_source(*ip)?;
    }

    let shared = Shared::new(
        orig_dst,
        cfg.connect_timeout,
        cfg.protocol_detect_timeout,
        cfg.mesh_networks.clone(),
        cfg.workloads
            .iter()
            .map(|(ip, id)| (ip.to_canonical(), id.clone()))
            .collect(),
    );
    let expected: crate::tls::Expected = Arc::new(
        cfg.workloads
            .iter()
            .filter_map(|(ip, id)| Some((*ip, crate::identity::SpiffeId::parse(id).ok()?)))
            .collect(),
    );
    // The agent's end of an accelerated hop is its own socket (its cgroup, not the pod's):
    // sock_ops must see it too. Detached when the agent exits.
    let _agent_sock_ops = if cfg.pods.iter().any(|p| p.accelerate) {
        let dir = std::fs::File::open(&own_dir).map_err(|source| EbpfError::Io {
            path: own_dir.clone(),
            source,
        })?;
        let link = crate::ebpf::attach_sock_ops(&mut kernel, &dir)?;
        info!(cgroup = %own_dir.display(), "acceleration: sock_ops attached to the agent's cgroup");
        Some(link)
    } else {
        None
    };
    let mut enrolled = Vec::new();
    let mut accept_loops = Vec::new();
    for (i, spec) in cfg.pods.iter().enumerate() {
        match enroll(&mut kernel, &cfg, spec, i as u32 + 1, &shared, &expected) {
            Ok((e, loops)) => {
                enrolled.push(e);
                accept_loops.extend(loops);
            }
            Err(err) => {
                error!(pod = %spec.name, error = %err, "enrollment failed; releasing the pods enrolled so far");
                shared.stop_accepting.cancel();
                let keep_maps = enrolled
                    .iter()
                    .any(|e| e.spec.fail_mode == FailMode::Closed);
                release(&mut kernel, enrolled);
                if !keep_maps {
                    crate::ebpf::dump::unpin_maps(&cfg.pin_root);
                }
                return Err(err);
            }
        }
    }
    let admin = crate::admin::Admin::new(
        shared.clone(),
        kernel.counters.clone(),
        cfg.pin_root.clone(),
    );
    *admin.pods.write().unwrap_or_else(|p| p.into_inner()) = enrolled
        .iter()
        .map(|e| crate::admin::PodView {
            pod: e.pod.clone(),
            netns: e.spec.netns.clone(),
            cgroup: e.spec.cgroup.clone(),
            netns_cookie: e.entry.netns_cookie,
            fail_mode: format!("{:?}", e.spec.fail_mode).to_lowercase(),
            programs: programs_of(&e.spec),
        })
        .collect();
    admin.serve(&cfg.admin_socket)?;
    if let Some(addr) = cfg.admin_tcp {
        admin.serve_tcp(addr).await?;
    }
    admin
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    info!(pods = enrolled.len(), outbound_port = cfg.outbound_port,
          inbound_port = cfg.inbound_port, admin_socket = %cfg.admin_socket.display(), "agent ready");

    wait_for_signal(&enrolled).await?;
    admin
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    info!("stopping: no new connections; draining");
    for e in &enrolled {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let policy = &e.pod.policy;
        let (id_ok, id_failed) = e.pod.tls.as_ref().map_or((0, 0), |t| {
            (get(&t.store.reloads_ok), get(&t.store.reloads_failed))
        });
        info!(pod = %e.spec.name, policy_reloads_ok = get(&policy.reloads_ok),
              policy_reloads_failed = get(&policy.reloads_failed),
              identity_reloads_ok = id_ok, identity_reloads_failed = id_failed, "reload counters");
    }

    // New connections first stop reaching the listeners: fail-open pods lose their
    // programs (traffic goes direct), fail-closed pods are switched to refusing.
    for e in &enrolled {
        if e.spec.fail_mode == FailMode::Closed {
            block(&mut kernel, e);
        }
    }
    let (closed, open): (Vec<_>, Vec<_>) = enrolled
        .into_iter()
        .partition(|e| e.spec.fail_mode == FailMode::Closed);
    release(&mut kernel, open);

    shared.stop_accepting.cancel();
    for l in accept_loops {
        let _ = l.await;
    }
    shared.tracker.close();
    let open_conns = shared.tracker.len();
    if tokio::time::timeout(cfg.drain_timeout, shared.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = shared.tracker.len(),
            deadline_ms = cfg.drain_timeout.as_millis() as u64,
            "drain deadline passed: cutting the remaining connections"
        );
        shared.abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), shared.tracker.wait()).await;
    } else {
        info!(drained = open_conns, "all connections finished");
    }
    let keep_maps = !closed.is_empty();
    release(&mut kernel, closed);
    log_counters(&kernel);
    if !keep_maps {
        // Nothing of ours stays in the kernel, so neither do the maps' pins.
        crate::ebpf::dump::unpin_maps(&cfg.pin_root);
    }
    info!(counters = %serde_json::to_string(&shared.counters()).unwrap_or_default(), "proxy counters");
    let _ = std::fs::remove_file(&cfg.admin_socket);
    info!("agent stopped");
    Ok(())
}

/// What is attached for a pod, as `agent pods` shows it.
fn programs_of(spec: &PodConfig) -> Vec<&'static str> {
    let mut p = Vec::new();
    if spec.redirect == Redirect::Ebpf {
        p.extend(["cgroup/connect4", "cgroup/connect6", "sock_ops"]);
    }
    p.push("sk_lookup");
    if spec.accelerate {
        p.push("sk_msg (splice)");
    }
    p
}

fn enroll(
    kernel: &mut Kernel,
    cfg: &Config,
    spec: &PodConfig,
    id: u32,
    shared: &Arc<Shared>,
    expected: &crate::tls::Expected,
) -> Result<(Enrolled, Vec<JoinHandle<()>>), RunError> {
    let policy = crate::authz::PolicyStore::load(spec.name.as_str(), spec.policy.clone()).map_err(
        |source| RunError::Policy {
            pod: spec.name.clone(),
            source,
        },
    )?;
    let mut watchers = Vec::new();
    if let Some(w) = policy.watch() {
        watchers.push(w.map_err(|source| RunError::Watch {
            pod: spec.name.clone(),
            source,
        })?);
    }
    let (tls, watcher) = match &spec.identity {
        Some(files) => {
            let store =
                IdentityStore::load(spec.name.clone(), files.clone()).map_err(|source| {
                    RunError::Identity {
                        pod: spec.name.clone(),
                        source,
                    }
                })?;
            let watcher = store.watch().map_err(|source| RunError::Watch {
                pod: spec.name.clone(),
                source,
            })?;
            let tls = PodTls {
                server: crate::tls::server_config(store.clone()),
                client: crate::tls::client_config(store.clone(), expected.clone()),
                store,
            };
            (Some(tls), Some(watcher))
        }
        None => (None, None),
    };
    let netns = Netns::open(&spec.netns)?;
    let cookie = netns.cookie()?;
    let addrs = netns.addresses()?;
    let pod = Arc::new(Pod {
        name: spec.name.clone(),
        id,
        netns,
        addrs: addrs.clone(),
        mode: spec.mode,
        tls,
        policy,
        // Only the iptables rule needs to tell the agent's own connects apart.
        redirect: spec.redirect,
        upstream_mark: (spec.redirect == Redirect::Iptables)
            .then_some(cfg.upstream_mark)
            .flatten(),
    });
    watchers.extend(watcher);
    // Listeners exist before any connection can be steered to them.
    let outbound = pod.bind_loopback(cfg.outbound_port)?;
    let inbound = pod.bind_loopback(cfg.inbound_port)?;
    for l in &inbound {
        let v6 = l.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
        kernel.listeners.set(id, v6, l)?;
    }
    let entry = PodEntry {
        netns_cookie: cookie,
        config: KernelPod {
            pod_id: id,
            flags: if spec.fail_mode == FailMode::Open {
                POD_FLAG_FAIL_OPEN
            } else {
                0
            } | if spec.accelerate {
                POD_FLAG_ACCELERATE
            } else {
                0
            },
            outbound_port: cfg.outbound_port,
            _pad: [0; 6],
        },
        addrs,
        outbound_excluded_ports: spec.exclude_ports.clone(),
        outbound_excluded_cidrs: spec.exclude_cidrs.clone(),
        inbound_excluded_ports: spec.exclude_inbound_ports.clone(),
        probe_ports: spec.probe_ports.clone(),
    };
    kernel.pods.install(&entry)?;
    let pin = spec.fail_mode == FailMode::Closed;
    let (links, replaced) = PodLinks::attach(
        kernel,
        &spec.name,
        &spec.cgroup,
        pod.netns.file(),
        &cfg.pin_root,
        pin,
        spec.redirect == Redirect::Ebpf,
    )?;
    if replaced > 0 {
        info!(pod = %spec.name, replaced, "adopted the pod from a previous agent");
    }
    let cgroup_id = cgroup::id_of(&spec.cgroup)?;
    info!(pod = %spec.name, pod_id = id, netns = %spec.netns.display(), netns_cookie = cookie,
          cgroup = %spec.cgroup.display(), cgroup_id, fail_mode = ?spec.fail_mode,
          addrs = ?entry.addrs, exclude_ports = ?spec.exclude_ports,
          exclude_cidrs = ?spec.exclude_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
          exclude_inbound_ports = ?spec.exclude_inbound_ports, probe_ports = ?spec.probe_ports,
          "pod enrolled");
    let loops = outbound
        .into_iter()
        .map(|l| (l, Direction::Outbound))
        .chain(inbound.into_iter().map(|l| (l, Direction::Inbound)))
        .map(|(l, d)| tokio::spawn(proxy::serve(l, d, pod.clone(), shared.clone())))
        .collect();
    Ok((
        Enrolled {
            spec: spec.clone(),
            entry,
            links,
            _watchers: watchers,
            pod: pod.clone(),
        },
        loops,
    ))
}

/// Fail-open pods: detach and forget. Fail-closed pods: block and leave the pins.
fn release(kernel: &mut Kernel, pods: Vec<Enrolled>) {
    for e in pods {
        match e.spec.fail_mode {
            FailMode::Open => {
                e.links.detach();
                kernel.pods.remove(&e.entry);
                info!(pod = %e.spec.name, "pod released (fail-open): nothing left attached");
            }
            FailMode::Closed => {
                block(kernel, &e);
                e.links.leave_pinned();
                info!(pod = %e.spec.name,
                      "pod released (fail-closed): its TCP connections are refused until an agent adopts it or `agent uninstall` runs");
            }
        }
    }
}

/// Makes a fail-closed pod's connect programs refuse every TCP connect. (Inbound needs no
/// switch: once the listeners close, sk_lookup finds no socket and drops.)
fn block(kernel: &mut Kernel, e: &Enrolled) {
    let mut blocked = e.entry.config;
    blocked.flags |= POD_FLAG_BLOCK;
    if let Err(err) = kernel.pods.set_config(e.entry.netns_cookie, blocked) {
        error!(pod = %e.spec.name, error = %err, "cannot switch the pod to blocking");
    }
}

fn log_counters(kernel: &Kernel) {
    let counters: std::collections::BTreeMap<&str, u64> =
        kernel.counters.snapshot().into_iter().collect();
    info!(counters = %serde_json::to_string(&counters).unwrap_or_default(), "kernel counters");
}

/// Waits for SIGTERM or SIGINT; SIGHUP reloads every pod's policy and identity meanwhile.
async fn wait_for_signal(pods: &[Enrolled]) -> Result<(), RunError> {
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Signals)?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!(signal = "SIGTERM", "signal received"); return Ok(()) }
            _ = int.recv() => { info!(signal = "SIGINT", "signal received"); return Ok(()) }
            _ = hup.recv() => {
                info!(signal = "SIGHUP", "reloading policies and identities");
                for e in pods {
                    e.pod.policy.reload();
                    if let Some(tls) = &e.pod.tls {
                        tls.store.reload();
                    }
                }
            }
        }
    }
}

/// Every proxied connection costs two descriptors; the usual soft limit of 1024 would cap
/// the agent at ~500 connections.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
