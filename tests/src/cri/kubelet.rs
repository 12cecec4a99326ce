//! What the kubelet does with a pod spec, over CRI: the pod cgroup by QoS class, the
//! sandbox (the runtime runs the CNI ADD chain), init containers to completion, native
//! sidecars started and awaited on their startup probe, then the application containers;
//! teardown in the kubelet's order (containers, StopPodSandbox, RemovePodSandbox: CNI DEL
//! twice). Pod specs are Kubernetes API types, so `deploy/`'s manifests run as shipped.
//!
//! Host paths a manifest names are remapped to test-owned directories (a test must not
//! write into a real node's /etc/cni or /var/lib/kubelet); CSI volumes are directories in
//! the kubelet's layout (`<pods dir>/<uid>/volumes/kubernetes.io~csi/<volume>/mount`) that
//! the test fills as a CSI driver would.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_cri::v1::{
    security_profile::ProfileType, Capability, ContainerConfig, ContainerMetadata, ContainerState,
    ImageSpec, Int64Value, KeyValue, LinuxContainerConfig, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, MountPropagation, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, SecurityProfile,
};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Probe};

use super::Cri;
use crate::sys::{cgroup_mounts, remove_cgroup_dirs as remove_cgroup_tree};

/// A pod the kubelet runs.
pub struct RunningPod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub sandbox: String,
    /// The pod's IPv4 address (none on the host network).
    pub ip: Option<String>,
    /// Container name to id, in the order they started.
    pub containers: Vec<(String, String)>,
    config: PodSandboxConfig,
    cgroup: String,
}

impl RunningPod {
    pub fn container(&self, name: &str) -> &str {
        self.containers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| id.as_str())
            .unwrap_or_else(|| panic!("pod {} has no container {name}", self.name))
    }
}

pub struct Kubelet {
    pub cri: Cri,
    /// The kubelet's cgroup root below every cgroup mount (`/simnode-ID/kubelet`).
    cgroup_root: String,
    /// Host paths of the manifests, replaced by the test's own.
    host_paths: Vec<(PathBuf, PathBuf)>,
    /// Where ConfigMap and emptyDir volumes and container logs are made.
    work: PathBuf,
    /// The kubelet's pods directory (CSI volumes live here), as the test maps it.
    pub pods_dir: PathBuf,
    config_maps: BTreeMap<String, ConfigMap>,
    /// The pod cgroups made, removed at the end even if a test forgot a pod.
    made: std::cell::RefCell<Vec<String>>,
}

/// `agent:0.1.0` as the runtime stores it.
fn normalize_image(image: &str) -> String {
    if image.contains('/') {
        image.to_string()
    } else {
        format!("docker.io/library/{image}")
    }
}

/// Kubernetes' `$(VAR)` expansion in commands and arguments.
fn expand(s: &str, env: &[KeyValue]) -> String {
    let mut out = s.to_string();
    for kv in env {
        out = out.replace(&format!("$({})", kv.key), &kv.value);
    }
    out
}

/// The pod's QoS class, as the kubelet derives it.
fn qos(pod: &Pod) -> &'static str {
    let spec = pod.spec.as_ref().expect("pod spec");
    let all: Vec<&Container> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect();
    let resources = |c: &Container| c.resources.clone().unwrap_or_default();
    let guaranteed = all.iter().all(|c| {
        let r = resources(c);
        let (req, lim) = (r.requests.unwrap_or_default(), r.limits.unwrap_or_default());
        ["cpu", "memory"]
            .iter()
            .all(|k| lim.contains_key(*k) && req.get(*k).is_none_or(|v| Some(v) == lim.get(*k)))
    });
    let any = all.iter().any(|c| {
        let r = resources(c);
        r.requests.is_some_and(|m| !m.is_empty()) || r.limits.is_some_and(|m| !m.is_empty())
    });
    if guaranteed {
        "guaranteed"
    } else if any {
        "burstable"
    } else {
        "besteffort"
    }
}

/// Every cgroup hierarchy mounted here (v1 controllers and the v2 tree).
impl Kubelet {
    /// A kubelet over `cri` whose cgroup root is `cgroup_root` (relative to the cgroup
    /// mounts; `""` is the kubelet's default, `/kubepods/...` at the top), with scratch
    /// space in `work`.
    pub fn new(cri: Cri, cgroup_root: &str, work: &Path) -> Kubelet {
        let pods_dir = work.join("kubelet-pods");
        std::fs::create_dir_all(&pods_dir).expect("kubelet pods dir");
        // As the kubelet does with its root directory: a shared mount, so volumes mounted
        // below it later propagate into containers that mount it HostToContainer.
        crate::sys::run(
            "mount",
            &[
                "--bind",
                &pods_dir.to_string_lossy(),
                &pods_dir.to_string_lossy(),
            ],
        );
        crate::sys::run("mount", &["--make-rshared", &pods_dir.to_string_lossy()]);
        Kubelet {
            cri,
            cgroup_root: cgroup_root.trim_end_matches('/').to_string(),
            host_paths: vec![(PathBuf::from("/var/lib/kubelet/pods"), pods_dir.clone())],
            work: work.to_path_buf(),
            pods_dir,
            config_maps: BTreeMap::new(),
            made: Default::default(),
        }
    }

    /// Host path `from` in manifests is `to` on this machine.
    pub fn map_host_path(&mut self, from: &str, to: &Path) {
        self.host_paths
            .push((PathBuf::from(from), to.to_path_buf()));
    }

    /// ConfigMaps pods may mount.
    pub fn add_config_map(&mut self, cm: ConfigMap) {
        let name = cm.metadata.name.clone().expect("a named ConfigMap");
        self.config_maps.insert(name, cm);
    }

    /// The cgroup v2 directory of the pod with `uid` (created by [`Kubelet::run`]).
    pub fn pod_cgroup(&self, qos: &str, uid: &str) -> PathBuf {
        crate::cgroup2_root().join(self.cgroup_parent(qos, uid).trim_start_matches('/'))
    }

    fn cgroup_parent(&self, qos: &str, uid: &str) -> String {
        match qos {
            "guaranteed" => format!("{}/kubepods/pod{uid}", self.cgroup_root),
            q => format!("{}/kubepods/{q}/pod{uid}", self.cgroup_root),
        }
    }

    /// Where the CSI driver would have mounted `pod`'s volume `volume`.
    pub fn csi_dir(&self, uid: &str, volume: &str) -> PathBuf {
        self.pods_dir
            .join(uid)
            .join("volumes/kubernetes.io~csi")
            .join(volume)
            .join("mount")
    }

    fn host_path(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        for (from, to) in &self.host_paths {
            if let Ok(rest) = p.strip_prefix(from) {
                return to.join(rest);
            }
        }
        p.to_path_buf()
    }

    /// Runs the pod to the point the kubelet reports it started (init containers done,
    /// sidecars started and past their startup probe, containers started).
    pub fn run(&self, pod: &Pod, uid: &str) -> Result<RunningPod, String> {
        let spec = pod.spec.as_ref().ok_or("no pod spec")?;
        let name = pod.metadata.name.clone().ok_or("no pod name")?;
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let host_network = spec.host_network == Some(true);
        let qos = qos(pod);
        let cgroup = self.cgroup_parent(qos, uid);
        // The kubelet makes the pod cgroup before the sandbox: at CNI ADD it is all there is.
        let v2 = crate::cgroup2_root().join(cgroup.trim_start_matches('/'));
        std::fs::create_dir_all(&v2).map_err(|e| format!("{}: {e}", v2.display()))?;
        self.made.borrow_mut().push(cgroup.clone());
        let logs = self.work.join("logs").join(uid);
        std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
        let namespaces = NamespaceOption {
            network: if host_network {
                NamespaceMode::Node
            } else {
                NamespaceMode::Pod
            } as i32,
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Pod as i32,
            ..Default::default()
        };
        let privileged = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.security_context.as_ref().and_then(|s| s.privileged) == Some(true));
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.clone(),
                uid: uid.into(),
                namespace: namespace.clone(),
                attempt: 0,
            }),
            // runc cannot set a hostname without a private UTS namespace.
            hostname: if host_network {
                String::new()
            } else {
                name.clone()
            },
            log_directory: logs.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: cgroup.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces),
                    privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sandbox = self.cri.run_pod(config.clone())?;
        let ip = self
            .cri
            .pod_status(&sandbox)?
            .network
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty());
        let mut running = RunningPod {
            uid: uid.into(),
            name,
            namespace,
            sandbox,
            ip,
            containers: Vec::new(),
            config,
            cgroup,
        };
        let result = (|| {
            for c in spec.init_containers.iter().flatten() {
                let id = self.start(pod, c, &running)?;
                running.containers.push((c.name.clone(), id.clone()));
                if c.restart_policy.as_deref() == Some("Always") {
                    // A native sidecar: started, and ready before anything after it.
                    if let Some(p) = &c.startup_probe {
                        self.probe(p, &running, &id)
                            .map_err(|e| format!("sidecar {}: startup probe: {e}", c.name))?;
                    }
                } else {
                    self.wait_exited(&running, &c.name, &id)?;
                }
            }
            for c in &spec.containers {
                let id = self.start(pod, c, &running)?;
                running.containers.push((c.name.clone(), id));
            }
            Ok::<(), String>(())
        })();
        match result {
            Ok(()) => Ok(running),
            Err(e) => {
                self.delete(&running);
                Err(e)
            }
        }
    }

    /// Waits until every container of the pod passes its startup and readiness probes
    /// (what `kubectl rollout status` waits for).
    pub fn wait_ready(&self, pod: &Pod, running: &RunningPod) -> Result<(), String> {
        let spec = pod.spec.as_ref().ok_or("no pod spec")?;
        for c in &spec.containers {
            for p in [&c.startup_probe, &c.readiness_probe].into_iter().flatten() {
                self.probe(p, running, running.container(&c.name))
                    .map_err(|e| {
                        format!("container {}: {e}\n{}", c.name, self.log(running, &c.name))
                    })?;
            }
        }
        Ok(())
    }

    /// Runs `run` until it succeeds, as the kubelet retries a pod whose sandbox failed.
    pub fn run_retrying(&self, pod: &Pod, uid: &str, until: Instant) -> Result<RunningPod, String> {
        loop {
            match self.run(pod, uid) {
                Ok(p) => return Ok(p),
                Err(e) if Instant::now() > until => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    fn env(&self, pod: &Pod, c: &Container, uid: &str) -> Vec<KeyValue> {
        let meta = &pod.metadata;
        c.env
            .iter()
            .flatten()
            .map(|e| {
                let value = match (&e.value, &e.value_from) {
                    (Some(v), _) => v.clone(),
                    (None, Some(from)) => {
                        match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                            Some("metadata.name") => meta.name.clone().unwrap_or_default(),
                            Some("metadata.namespace") => {
                                meta.namespace.clone().unwrap_or_else(|| "default".into())
                            }
                            Some("metadata.uid") => uid.to_string(),
                            other => panic!(
                                "the test kubelet has no value for env {} ({other:?})",
                                e.name
                            ),
                        }
                    }
                    (None, None) => String::new(),
                };
                KeyValue {
                    key: e.name.clone(),
                    value,
                }
            })
            .collect()
    }

    fn mounts(&self, pod: &Pod, c: &Container, uid: &str) -> Result<Vec<Mount>, String> {
        let spec = pod.spec.as_ref().expect("pod spec");
        let mut out = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let v = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == m.name)
                .ok_or_else(|| format!("container {} mounts unknown volume {}", c.name, m.name))?;
            let host = if let Some(hp) = &v.host_path {
                let p = self.host_path(&hp.path);
                if hp
                    .type_
                    .as_deref()
                    .is_some_and(|t| t == "DirectoryOrCreate")
                {
                    std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                }
                if !p.exists() {
                    return Err(format!(
                        "hostPath {} ({}) does not exist",
                        hp.path,
                        p.display()
                    ));
                }
                p
            } else if let Some(cm) = &v.config_map {
                let data = self
                    .config_maps
                    .get(&cm.name)
                    .ok_or_else(|| format!("no ConfigMap {}", cm.name))?;
                let dir = self.work.join("volumes").join(uid).join(&v.name);
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                for (k, val) in data.data.iter().flatten() {
                    std::fs::write(dir.join(k), val).map_err(|e| e.to_string())?;
                }
                dir
            } else if v.csi.is_some() {
                let dir = self.csi_dir(uid, &v.name);
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                dir
            } else if v.empty_dir.is_some() {
                let dir = self.work.join("volumes").join(uid).join(&v.name);
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                dir
            } else {
                return Err(format!("the test kubelet cannot mount volume {}", v.name));
            };
            let propagation = match m.mount_propagation.as_deref() {
                Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
                Some("Bidirectional") => MountPropagation::PropagationBidirectional,
                _ => MountPropagation::PropagationPrivate,
            };
            out.push(Mount {
                container_path: m.mount_path.clone(),
                host_path: host.display().to_string(),
                readonly: m.read_only == Some(true),
                propagation: propagation as i32,
                ..Default::default()
            });
        }
        Ok(out)
    }

    fn start(&self, pod: &Pod, c: &Container, running: &RunningPod) -> Result<String, String> {
        let env = self.env(pod, c, &running.uid);
        let spec = pod.spec.as_ref().expect("pod spec");
        let sc = c.security_context.clone().unwrap_or_default();
        let caps = sc.capabilities.clone().unwrap_or_default();
        let host_network = spec.host_network == Some(true);
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: c.name.clone(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: normalize_image(c.image.as_deref().unwrap_or("")),
                ..Default::default()
            }),
            command: c
                .command
                .iter()
                .flatten()
                .map(|s| expand(s, &env))
                .collect(),
            args: c.args.iter().flatten().map(|s| expand(s, &env)).collect(),
            working_dir: c.working_dir.clone().unwrap_or_default(),
            mounts: self.mounts(pod, c, &running.uid)?,
            envs: env,
            log_path: format!("{}.log", c.name),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    capabilities: Some(Capability {
                        add_capabilities: caps.add.unwrap_or_default(),
                        drop_capabilities: caps.drop.unwrap_or_default(),
                        ..Default::default()
                    }),
                    privileged: sc.privileged == Some(true),
                    run_as_user: sc.run_as_user.map(|value| Int64Value { value }),
                    namespace_options: Some(NamespaceOption {
                        network: if host_network {
                            NamespaceMode::Node
                        } else {
                            NamespaceMode::Pod
                        } as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    seccomp: Some(SecurityProfile {
                        profile_type: match sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
                            Some("Unconfined") => ProfileType::Unconfined,
                            _ => ProfileType::RuntimeDefault,
                        } as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self
            .cri
            .create_container(&running.sandbox, config, &running.config)
            .map_err(|e| format!("create container {}: {e}", c.name))?;
        self.cri.start_container(&id).map_err(|e| {
            format!(
                "start container {}: {e}\n{}",
                c.name,
                self.log(running, &c.name)
            )
        })?;
        Ok(id)
    }

    /// The container's log so far (the CRI log format, one line per output line).
    pub fn log(&self, running: &RunningPod, container: &str) -> String {
        std::fs::read_to_string(
            self.work
                .join("logs")
                .join(&running.uid)
                .join(format!("{container}.log")),
        )
        .unwrap_or_default()
    }

    fn wait_exited(&self, running: &RunningPod, name: &str, id: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.cri.container_status(id)?;
            if s.state == ContainerState::ContainerExited as i32 {
                if s.exit_code == 0 {
                    return Ok(());
                }
                return Err(format!(
                    "init container {name} exited {}: {}",
                    s.exit_code,
                    self.log(running, name)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("init container {name} did not finish within 60 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `probe` until it passes, within its failure threshold.
    fn probe(&self, p: &Probe, running: &RunningPod, id: &str) -> Result<(), String> {
        let period = Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
        let deadline = Instant::now() + period * p.failure_threshold.unwrap_or(3).max(1) as u32;
        let mut last = String::new();
        loop {
            let passed = if let Some(exec) = &p.exec {
                let cmd: Vec<&str> = exec.command.iter().flatten().map(String::as_str).collect();
                match self.cri.exec(id, &cmd, Duration::from_secs(5)) {
                    Ok((0, _, _)) => true,
                    Ok((code, out, err)) => {
                        last = format!("exit {code}: {out}{err}");
                        false
                    }
                    Err(e) => {
                        last = e;
                        false
                    }
                }
            } else if let Some(h) = &p.http_get {
                let host = h
                    .host
                    .clone()
                    .or_else(|| running.ip.clone())
                    .unwrap_or_else(|| "127.0.0.1".into());
                let port = match &h.port {
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n as u16,
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => {
                        return Err(format!("named probe port {s} is not supported"))
                    }
                };
                match http_get(&host, port, h.path.as_deref().unwrap_or("/")) {
                    Ok(200..=399) => true,
                    Ok(code) => {
                        last = format!("status {code}");
                        false
                    }
                    Err(e) => {
                        last = e;
                        false
                    }
                }
            } else {
                return Err("the test kubelet supports exec and httpGet probes".into());
            };
            if passed {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(last);
            }
            // Faster than the probe's period: the tests measure gaps, not probe timing.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Creates the container `name` again (the kubelet's restart: a new container with the
    /// next attempt number) in the running pod.
    pub fn restart(&self, pod: &Pod, running: &mut RunningPod, name: &str) -> Result<(), String> {
        let spec = pod.spec.as_ref().ok_or("no pod spec")?;
        let c = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == name)
            .ok_or_else(|| format!("no container {name}"))?;
        let _ = self.cri.remove_container(running.container(name));
        let id = self.start(pod, c, running)?;
        for (n, old) in running.containers.iter_mut() {
            if n == name {
                *old = id.clone();
            }
        }
        Ok(())
    }

    /// Tears the pod down in the kubelet's order (preStop hooks, containers, sandbox);
    /// errors are reported, not fatal.
    pub fn delete_pod(&self, pod: &Pod, p: &RunningPod) {
        let spec = pod.spec.as_ref().expect("pod spec");
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            let hook = c
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref())
                .and_then(|h| h.exec.as_ref());
            if let (Some(exec), Some((_, id))) =
                (hook, p.containers.iter().find(|(n, _)| *n == c.name))
            {
                let cmd: Vec<&str> = exec.command.iter().flatten().map(String::as_str).collect();
                match self.cri.exec(id, &cmd, Duration::from_secs(10)) {
                    Ok((0, _, _)) => {}
                    other => eprintln!("kubelet: preStop of {}: {other:?}", c.name),
                }
            }
        }
        self.delete(p);
    }

    /// Tears the pod down in the kubelet's order; errors are reported, not fatal.
    pub fn delete(&self, p: &RunningPod) {
        for (_, id) in p.containers.iter().rev() {
            let _ = self.cri.stop_container(id, 2);
        }
        if let Err(e) = self.cri.stop_pod(&p.sandbox) {
            eprintln!("kubelet: StopPodSandbox {}: {e}", p.name);
        }
        if let Err(e) = self.cri.remove_pod(&p.sandbox) {
            eprintln!("kubelet: RemovePodSandbox {}: {e}", p.name);
        }
        for m in cgroup_mounts() {
            remove_cgroup_tree(&m.join(p.cgroup.trim_start_matches('/')));
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.cri.remove_all_pods();
        crate::sys::run_quiet("umount", &["-R", "-l", &self.pods_dir.to_string_lossy()]);
        for m in cgroup_mounts() {
            for cg in self.made.borrow().iter() {
                let dir = m.join(cg.trim_start_matches('/'));
                remove_cgroup_tree(&dir);
                // The QoS and kubepods levels, when nothing else is left in them.
                let top = m
                    .join(self.cgroup_root.trim_start_matches('/'))
                    .join("kubepods");
                for parent in dir.ancestors().skip(1).take(2) {
                    if parent.starts_with(&top) {
                        let _ = std::fs::remove_dir(parent);
                    }
                }
            }
        }
    }
}

/// One HTTP/1.1 GET; the status code.
fn http_get(host: &str, port: u16, path: &str) -> Result<u16, String> {
    let addr: std::net::SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| format!("{host}:{port}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {line:?}"))
}
