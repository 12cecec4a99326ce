//! The pods of this node, enrolled and released at runtime.
//!
//! One task owns this registry (and with it the kernel's maps and links), so enrolments,
//! releases, address changes and the reaping of vanished pods are applied one at a time,
//! in order. Everything a pod gets is derived from its one [`PodSpec`]: the proxy's view
//! ([`Pod`]), the kernel entry ([`PodEntry`]), its links, its record in the state
//! directory and the admin view.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use agent_common::{
    PodConfig as KernelPod, POD_FLAG_ACCELERATE, POD_FLAG_BLOCK, POD_FLAG_FAIL_OPEN,
    POD_FLAG_STRICT, POD_FLAG_UDP_DENY,
};
use aya::programs::links::FdLink;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::{
    admin::{Admin, ControlError, ControlReply, PodView},
    authn::{
        basic::{Basic, HtpasswdSource, HtpasswdStore, CONCURRENT_CHECKS},
        jwt::{Issuer, JwksSource, JwksStore},
        Authn,
    },
    authz::{PolicySource, PolicyStore},
    ebpf::{Attach, Kernel, PodEntry, PodLinks},
    identity::{workload_api, IdentitySource, IdentityStore},
    netns::{Addresses, Netns},
    proxy::{
        self,
        edge::EdgePort,
        limits::{CallerLimits, Limits},
        Lifecycle, Pod, PodTls, Shared,
    },
    spec::{PodDefaults, PodSpec},
    state::{Origin, Record, StateDir, Status},
    tls::{
        edge::{EdgeSource, EdgeStore},
        Expected,
    },
    types::{Direction, FailMode, Mode, PodId, PodName, Redirect, UdpOutbound},
};

/// The node-wide settings enrolment needs.
pub(super) struct NodeSettings {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub pin_root: PathBuf,
    pub drain_timeout: Duration,
    pub pod_defaults: PodDefaults,
    /// Node mode: pods a container runtime hands over through the CNI plugin.
    pub node_mode: Option<crate::k8s::NodeMode>,
}

/// What reaches the registry's task besides admin requests.
pub(super) enum Event {
    /// A pod's address set changed (`gen` tells this enrolment from an earlier one).
    Addresses {
        name: PodName,
        gen: u64,
        addrs: Addresses,
    },
    /// A release finished draining the pod's connections.
    Drained {
        name: PodName,
        gen: u64,
        open: usize,
        cut: usize,
    },
    /// A new agent asks for this one's listeners (hot restart).
    Handover(oneshot::Sender<super::handover::Offer>),
    /// The new agent serves every pod: stop accepting and drain.
    HandedOver,
}

/// How a served pod got here, for the admin view.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Config,
    Api,
    /// A container runtime, through the CNI plugin.
    Cni,
    /// Re-adopted from the state a previous agent recorded.
    State,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Api => "api",
            Source::Cni => "cni",
            Source::State => "state",
        }
    }
    fn origin(self) -> Origin {
        match self {
            Source::Config => Origin::Config,
            Source::Api | Source::Cni | Source::State => Origin::Api,
        }
    }
}

/// A pod the agent serves.
struct Served {
    gen: u64,
    spec: PodSpec,
    source: Source,
    pod: Arc<Pod>,
    entry: PodEntry,
    links: PodLinks,
    netns_ident: (u64, u64),
    addrs: Addresses,
    /// Keep the identity and policy files watched while the pod is served.
    _watchers: Vec<notify::RecommendedWatcher>,
    /// Keeps following the Workload API's stream while the pod is served.
    _identity_feed: Option<workload_api::Feed>,
    addr_task: tokio::task::JoinHandle<()>,
    /// Set while a release drains the pod: who is waiting for it to finish.
    releasing: Option<Vec<oneshot::Sender<ControlReply>>>,
    /// A second descriptor of each listening socket, for a hot restart to hand over.
    /// Dropped as soon as the pod stops accepting, so a closed pod's listeners really
    /// close (sk_lookup then finds no socket and drops).
    listeners: Vec<(SocketAddr, std::net::TcpListener)>,
    /// Its links replaced pinned ones (a previous agent's, or its own while blocked).
    adopted: bool,
    /// Once drained, remove everything rather than honour the fail mode (the runtime
    /// deleted the pod: there is nothing left to protect).
    remove_after_drain: bool,
}

/// A fail-closed pod the agent does not serve: its pinned programs refuse its
/// connections until it is enrolled again or its namespace goes away.
pub(super) struct Blocked {
    pub id: Option<PodId>,
    /// The namespace's path and its (device, inode), when known.
    pub netns: Option<(PathBuf, (u64, u64))>,
    pub cgroup: Option<PathBuf>,
    pub record: Option<Record>,
    /// Its entry in this agent's maps (blocking its connects), when it has one.
    pub entry: Option<PodEntry>,
    pub note: String,
}

impl Blocked {
    /// A pod the agent knows only by name (and, maybe, by its pins).
    pub fn unknown(note: impl Into<String>) -> Self {
        Self {
            id: None,
            netns: None,
            cgroup: None,
            record: None,
            entry: None,
            note: note.into(),
        }
    }
}

pub(super) struct Node {
    kernel: Kernel,
    shared: Arc<Shared>,
    expected: Expected,
    settings: NodeSettings,
    state: StateDir,
    events: mpsc::UnboundedSender<Event>,
    admin: Arc<Admin>,
    own_cgroup: PathBuf,
    served: BTreeMap<PodName, Served>,
    pub(super) blocked: BTreeMap<String, Blocked>,
    /// Which pod each steered address belongs to (a node-wide key in the kernel).
    owners: HashMap<IpAddr, PodName>,
    next_gen: u64,
    /// splice_track on the agent's own cgroup, once a pod wants the splice.
    agent_sock_ops: Option<FdLink>,
    /// Listening sockets a previous agent handed over, by (pod, address), until the pod
    /// is enrolled on them.
    inherited: HashMap<(String, SocketAddr), std::net::TcpListener>,
}

fn failed(e: impl std::fmt::Display) -> ControlError {
    ControlError::Failed(e.to_string())
}

impl Node {
    #[allow(
        clippy::too_many_arguments,
        reason = "the registry's parts, assembled once by run()"
    )]
    pub(super) fn new(
        kernel: Kernel,
        shared: Arc<Shared>,
        expected: Expected,
        settings: NodeSettings,
        state: StateDir,
        events: mpsc::UnboundedSender<Event>,
        admin: Arc<Admin>,
        own_cgroup: PathBuf,
    ) -> Self {
        Self {
            kernel,
            shared,
            expected,
            settings,
            state,
            events,
            admin,
            own_cgroup,
            served: BTreeMap::new(),
            blocked: BTreeMap::new(),
            owners: HashMap::new(),
            next_gen: 1,
            agent_sock_ops: None,
            inherited: HashMap::new(),
        }
    }

    /// Listening sockets a previous agent handed over; pods enrolled from now on use them.
    pub(super) fn inherit(
        &mut self,
        listeners: HashMap<(String, SocketAddr), std::net::TcpListener>,
    ) {
        self.inherited = listeners;
    }

    /// Sockets handed over but not used (the pod was not enrolled again): closed now.
    pub(super) fn unused_inherited(&mut self) -> usize {
        std::mem::take(&mut self.inherited).len()
    }

    /// What a new agent takes over: every served pod's listening sockets, and the map
    /// where this agent's programs record original destinations.
    pub(super) fn offer(&self) -> super::handover::Offer {
        let pods = self
            .served
            .iter()
            .filter(|(_, s)| s.releasing.is_none())
            .map(|(name, s)| {
                let fds = s
                    .listeners
                    .iter()
                    .filter_map(|(addr, l)| Some((*addr, l.try_clone().ok()?.into())))
                    .collect();
                (name.to_string(), fds)
            })
            .collect();
        super::handover::Offer {
            pods,
            orig_dst: self.shared.orig_dst.dup_fd().ok(),
        }
    }

    pub(super) fn defaults(&self) -> &PodDefaults {
        &self.settings.pod_defaults
    }

    pub(super) fn pin_root(&self) -> &Path {
        &self.settings.pin_root
    }

    pub(super) fn state(&self) -> &StateDir {
        &self.state
    }

    pub(super) fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    pub(super) fn metrics(&self) -> Arc<crate::telemetry::metrics::Metrics> {
        self.shared.metrics.clone()
    }

    pub(super) fn served_count(&self) -> usize {
        self.served.len()
    }

    pub(super) fn is_known(&self, name: &str) -> bool {
        self.blocked.contains_key(name) || self.served.keys().any(|n| n.as_str() == name)
    }

    /// SIGHUP: every served pod reads its policy and identity again.
    pub(super) fn reload_all(&self) {
        for s in self.served.values() {
            s.pod.policy.reload();
            if let Some(tls) = &s.pod.tls {
                tls.store.reload();
            }
        }
    }

    /// Handles one admin request.
    pub(super) async fn control(&mut self, c: crate::admin::Control) {
        match c {
            crate::admin::Control::Enroll { request, reply } => {
                let result =
                    match request.validate("", &self.settings.pod_defaults, &crate::spec::System) {
                        Ok(spec) => self.enroll(spec, Source::Api).await,
                        Err(e) => Err(ControlError::Invalid(e.to_string())),
                    };
                if let Err(e) = &result {
                    warn!(pod = %request.name, error = %e, "enrolment refused");
                }
                let _ = reply.send(result);
            }
            crate::admin::Control::Release { name, reply } => self.release(&name, reply, false),
            crate::admin::Control::Cni { request, reply } => self.cni(*request, reply).await,
        }
    }

    /// A container runtime's CNI plugin: ADD enrols (or skips, or blocks) the pod, DEL
    /// releases it and removes everything (idempotent), CHECK tells whether it is attached.
    async fn cni(&mut self, req: crate::cni::CniRequest, reply: oneshot::Sender<ControlReply>) {
        use crate::{cni::CniCommand, k8s::Admission};
        let Some(mode) = self.settings.node_mode.clone() else {
            let _ = reply.send(Err(ControlError::Invalid(
                "this agent has no [node] table in its config, so it enrols no pods for a container runtime: add one".into(),
            )));
            return;
        };
        if let Err(r) = req.pod.validate() {
            let _ = reply.send(Err(ControlError::Invalid(format!("kubernetes: {r}"))));
            return;
        }
        let name = req.pod.pod_name();
        let result = match req.command {
            CniCommand::Add => {
                let Some(netns) = &req.netns else {
                    let _ = reply.send(Err(ControlError::Invalid("ADD without CNI_NETNS".into())));
                    return;
                };
                info!(pod = %req.pod, name = %name, netns = %netns.display(), ips = ?req.ips,
                      "CNI ADD");
                match mode.admit(&req.pod, netns) {
                    Err(r) => Err(ControlError::Invalid(r)),
                    Ok(Admission::Skip(reason)) => {
                        info!(pod = %req.pod, reason = %reason, "CNI ADD: not enrolled");
                        Ok(json!({"pod": name, "result": "skipped", "reason": reason}))
                    }
                    Ok(Admission::Enrol(request)) => {
                        match request.validate(
                            "",
                            &self.settings.pod_defaults,
                            &crate::spec::System,
                        ) {
                            Ok(spec) => self.enroll(spec, Source::Cni).await,
                            Err(e) => Err(ControlError::Invalid(e.to_string())),
                        }
                    }
                    Ok(Admission::Block(request, reason)) => {
                        match request.validate(
                            "",
                            &self.settings.pod_defaults,
                            &crate::spec::System,
                        ) {
                            Ok(spec) => self.enroll_blocked(spec, reason).await,
                            Err(e) => Err(ControlError::Invalid(e.to_string())),
                        }
                    }
                }
            }
            CniCommand::Del => {
                info!(pod = %req.pod, name = %name, "CNI DEL");
                if self.served.contains_key(&name) {
                    return self.release(name.as_str(), reply, true);
                }
                match self.blocked.remove(name.as_str()) {
                    Some(b) => {
                        self.remove_blocked(name.as_str(), b);
                        self.publish();
                        Ok(json!({"pod": name, "result": "released"}))
                    }
                    None => Ok(json!({"pod": name, "result": "not_enrolled"})),
                }
            }
            CniCommand::Check => match (self.served.get(&name), self.blocked.get(name.as_str())) {
                (Some(s), _) if s.releasing.is_none() && s.pod.netns.still_at_path() => {
                    Ok(json!({"pod": name, "result": "enrolled"}))
                }
                (None, Some(b)) => Ok(json!({"pod": name, "result": "blocked", "reason": b.note})),
                _ => Err(ControlError::NotFound(format!(
                    "pod {name} is not enrolled and attached"
                ))),
            },
        };
        if let Err(e) = &result {
            warn!(pod = %req.pod, command = ?req.command, error = %e, "CNI request refused");
        }
        let _ = reply.send(result);
    }

    /// Enrols a pod that must not be served: its programs are attached and pinned and its
    /// connections refused, until it is enrolled again.
    async fn enroll_blocked(&mut self, spec: PodSpec, reason: String) -> ControlReply {
        let name = spec.name.clone();
        if self.served.contains_key(&name) {
            return Err(ControlError::Conflict(format!(
                "pod {name} is served; release it before it can be blocked"
            )));
        }
        if let Some(b) = self.blocked.get(name.as_str()) {
            return Ok(json!({"pod": name, "result": "blocked", "reason": b.note}));
        }
        let netns = Netns::open(&spec.netns).map_err(failed)?;
        let cookie = netns.cookie().map_err(failed)?;
        let id = self.free_id();
        let mut entry = kernel_entry(&spec, id, cookie, self.settings.outbound_port);
        entry.outbound_excluded_ports.clear();
        entry.outbound_excluded_cidrs.clear();
        entry.inbound_excluded_ports.clear();
        entry.probe_ports.clear();
        entry.config.flags |= POD_FLAG_BLOCK;
        self.kernel
            .pods
            .set_config(cookie, entry.config)
            .map_err(failed)?;
        let attached = PodLinks::attach(
            &mut self.kernel,
            &name,
            &spec.cgroup,
            netns.file(),
            Attach {
                pin_root: &self.settings.pin_root,
                pin: true,
                redirect: true,
                splice: false,
            },
        );
        let links = match attached {
            Ok((links, _)) => links,
            Err(e) => {
                self.kernel.pods.remove(&entry);
                return Err(failed(e));
            }
        };
        links.leave_pinned();
        let record = Record::new(
            id,
            Origin::Api,
            Status::Blocked,
            netns.ident(),
            spec.request.clone(),
        );
        if let Err(e) = self.state.write(name.as_str(), &record) {
            error!(pod = %name, error = %e, "cannot record the pod as blocked");
        }
        warn!(pod = %name, reason = %reason, "pod enrolled BLOCKED (fail-closed): its connections are refused until it is enrolled with what it lacks");
        self.blocked.insert(
            name.to_string(),
            Blocked {
                id: Some(id),
                netns: Some((spec.netns.clone(), netns.ident())),
                cgroup: Some(spec.cgroup.clone()),
                record: Some(record),
                entry: Some(entry),
                note: reason.clone(),
            },
        );
        self.publish();
        Ok(json!({"pod": name, "result": "blocked", "reason": reason, "pod_id": id}))
    }

    /// Enrols a pod, or confirms it is already enrolled with the same spec. On error
    /// nothing of the request stays behind.
    pub(super) async fn enroll(&mut self, spec: PodSpec, source: Source) -> ControlReply {
        self.enroll_as(spec, source, None).await
    }

    /// [`Node::enroll`], keeping the pod's id from a previous agent when it is free.
    pub(super) async fn enroll_as(
        &mut self,
        spec: PodSpec,
        source: Source,
        want_id: Option<PodId>,
    ) -> ControlReply {
        let name = spec.name.clone();
        if let Some(s) = self.served.get(&name) {
            if s.releasing.is_some() {
                return Err(ControlError::Conflict(format!(
                    "pod {name} is being released; enrol it again once that is done"
                )));
            }
            let diff = s.spec.diff(&spec);
            if diff.is_empty() {
                return Ok(json!({"pod": name, "result": "unchanged", "pod_id": s.pod.id}));
            }
            return Err(ControlError::Conflict(format!(
                "pod {name} is already enrolled with a different spec ({}): release it first",
                diff.join("; ")
            )));
        }
        for (other, s) in &self.served {
            if s.spec.netns == spec.netns {
                return Err(ControlError::Invalid(format!(
                    "netns: {} is already used by pod {other}",
                    spec.netns.display()
                )));
            }
            if s.spec.cgroup == spec.cgroup {
                return Err(ControlError::Invalid(format!(
                    "cgroup: {} is already used by pod {other}",
                    spec.cgroup.display()
                )));
            }
        }
        let previous = self.blocked.remove(name.as_str());
        match self.attach(&spec, source, previous.as_ref(), want_id).await {
            Ok(served) => {
                // A blocked pod's entry (kept without exclusions) was overwritten by the
                // new one: the kernel key is the namespace.
                let (id, adopted) = (served.pod.id, served.adopted);
                self.record(&served, Status::Enrolled);
                self.served.insert(name.clone(), served);
                self.publish();
                Ok(json!({"pod": name, "result": "enrolled", "pod_id": id, "adopted": adopted}))
            }
            Err(e) => {
                if let Some(b) = previous {
                    self.blocked.insert(name.to_string(), b);
                }
                Err(e)
            }
        }
    }

    fn id_in_use(&self, id: PodId) -> bool {
        self.served.values().any(|s| s.pod.id == id)
    }

    fn free_id(&self) -> PodId {
        (1..)
            .map(PodId)
            .find(|id| !self.id_in_use(*id))
            .expect("fewer pods than ids")
    }

    /// Everything for one pod, in an order that never exposes it: stores, namespace,
    /// listeners, then the kernel entry, addresses and links.
    async fn attach(
        &mut self,
        spec: &PodSpec,
        source: Source,
        previous: Option<&Blocked>,
        want_id: Option<PodId>,
    ) -> Result<Served, ControlError> {
        let name = spec.name.clone();
        let id = previous
            .and_then(|b| b.id)
            .or(want_id)
            .filter(|id| !self.id_in_use(*id))
            .unwrap_or_else(|| self.free_id());
        let policy = PolicyStore::load(name.clone(), PolicySource(spec.policy.clone()))
            .map_err(|e| ControlError::Invalid(format!("policy: {e}")))?;
        let mut watchers = Vec::new();
        watchers.extend(
            policy
                .watch()
                .map_err(|e| failed(format!("cannot watch the policy file: {e}")))?,
        );
        let mut identity_feed = None;
        let store = match (&spec.identity, &spec.workload_api) {
            (Some(files), _) => {
                let store = IdentityStore::load(name.clone(), IdentitySource::Files(files.clone()))
                    .map_err(|e| ControlError::Invalid(format!("identity: {e}")))?;
                watchers.extend(
                    store
                        .watch()
                        .map_err(|e| failed(format!("cannot watch the identity files: {e}")))?,
                );
                Some(store)
            }
            (None, Some(api)) => {
                let (store, feed) = workload_api::start(name.clone(), api.clone())
                    .await
                    .map_err(|e| ControlError::Invalid(format!("identity: {e}")))?;
                identity_feed = Some(feed);
                Some(store)
            }
            (None, None) => None,
        };
        let tls = store.map(|store| PodTls {
            server: crate::tls::server_config(store.clone()),
            client: crate::tls::client_config(store.clone(), self.expected.clone()),
            store,
        });
        let mut edge = Vec::new();
        for (i, e) in spec.edge.iter().enumerate() {
            let store = EdgeStore::load(name.clone(), EdgeSource(e.files.clone()))
                .map_err(|err| ControlError::Invalid(format!("edge[{i}]: {err}")))?;
            watchers.extend(store.watch().map_err(|err| {
                failed(format!("cannot watch the edge certificate files: {err}"))
            })?);
            edge.push(EdgePort {
                ports: e.ports.clone(),
                store,
                redirect_http: e.redirect_http,
            });
        }
        let authn = match &spec.authn {
            Some(a) => {
                let mut issuers = Vec::new();
                for (i, j) in a.jwt.iter().enumerate() {
                    let source = JwksSource {
                        path: j.jwks.clone(),
                        issuer: j.issuer.clone(),
                    };
                    let jwks = JwksStore::load(name.clone(), source)
                        .map_err(|e| ControlError::Invalid(format!("authn.jwt[{i}]: {e}")))?;
                    watchers.extend(
                        jwks.watch()
                            .map_err(|e| failed(format!("cannot watch the JWKS file: {e}")))?,
                    );
                    issuers.push(Issuer {
                        issuer: j.issuer.clone(),
                        audiences: j.audiences.clone(),
                        skew_seconds: j.clock_skew_seconds,
                        jwks,
                    });
                }
                let basic = match &a.basic {
                    Some(b) => {
                        let file =
                            HtpasswdStore::load(name.clone(), HtpasswdSource(b.htpasswd.clone()))
                                .map_err(|e| ControlError::Invalid(format!("authn.basic: {e}")))?;
                        watchers.extend(file.watch().map_err(|e| {
                            failed(format!("cannot watch the credentials file: {e}"))
                        })?);
                        Some(Basic {
                            realm: b.realm.clone().unwrap_or_else(|| name.to_string()),
                            htpasswd: file,
                            checks: tokio::sync::Semaphore::new(CONCURRENT_CHECKS),
                        })
                    }
                    None => None,
                };
                Some(Authn {
                    basic,
                    ports: a.ports.clone(),
                    subject_header: a
                        .subject_header
                        .as_ref()
                        .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
                    forward_token: a.forward_token,
                    issuers,
                })
            }
            None => None,
        };
        let netns = Netns::open(&spec.netns).map_err(failed)?;
        let cookie = netns.cookie().map_err(failed)?;
        let netns_ident = netns.ident();
        // Subscribed before the first read, so no address change is missed.
        let mut watch = netns.watch_addresses().map_err(failed)?;
        let addrs = watch.current().await.map_err(failed)?;
        let pod = Arc::new(Pod {
            name: name.clone(),
            id,
            netns,
            mode: spec.mode,
            tls,
            policy,
            edge,
            authn,
            redirect: spec.redirect,
            upstream_mark: spec.upstream_mark,
            life: Lifecycle::default(),
            limits: Limits::for_pod(&self.shared.settings.limits),
            caller_limits: CallerLimits::new(spec.limits.as_ref()),
        });
        // Listeners exist before any connection can be steered to them. Those a previous
        // agent handed over are used as they are: what is queued in them is not lost.
        let inherited = &mut self.inherited;
        let mut take = |addr: SocketAddr| inherited.remove(&(name.to_string(), addr));
        let outbound = pod
            .listeners(self.settings.outbound_port, &mut take)
            .map_err(failed)?;
        let inbound = pod
            .listeners(self.settings.inbound_port, &mut take)
            .map_err(failed)?;
        let mut dups = Vec::new();
        for l in outbound.iter().chain(&inbound) {
            if let (Ok(addr), Ok(dup)) = (l.local_addr(), l.try_clone()) {
                dups.push((addr, dup));
            }
        }
        for l in &inbound {
            let v6 = l.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
            self.kernel.listeners.set(id.0, v6, l).map_err(failed)?;
        }
        let entry = kernel_entry(spec, id, cookie, self.settings.outbound_port);
        if let Err(e) = self.kernel.pods.install(&entry) {
            self.kernel.pods.remove(&entry);
            return Err(failed(e));
        }
        let mut claimed = Addresses::new();
        for ip in &addrs {
            if self.claim(&name, &entry, *ip) {
                claimed.insert(*ip);
            }
        }
        if let (true, Some(why)) = (spec.accelerate, &self.kernel.splice_off) {
            warn!(pod = %name, missing = %why,
                  "acceleration asked for, but the splice is unavailable on this kernel: the pod is served without it");
        }
        let splice = self.spliced(spec);
        let attached = PodLinks::attach(
            &mut self.kernel,
            &name,
            &spec.cgroup,
            pod.netns.file(),
            Attach {
                pin_root: &self.settings.pin_root,
                pin: spec.fail_mode == FailMode::Closed,
                redirect: spec.redirect == Redirect::Ebpf,
                splice,
            },
        );
        let (links, replaced) = match attached {
            Ok(l) => l,
            Err(e) => {
                for ip in &claimed {
                    self.unclaim(&name, *ip);
                }
                self.kernel.pods.remove(&entry);
                return Err(failed(e));
            }
        };
        if replaced > 0 {
            info!(pod = %name, replaced, "adopted the pod from a previous agent");
        }
        if splice {
            self.ensure_agent_sock_ops();
        }
        let gen = self.next_gen;
        self.next_gen += 1;
        for (listeners, direction) in [
            (outbound, Direction::Outbound),
            (inbound, Direction::Inbound),
        ] {
            for l in listeners {
                tokio::spawn(proxy::serve(l, direction, pod.clone(), self.shared.clone()));
            }
        }
        let events = self.events.clone();
        let watched = name.clone();
        let addr_task = tokio::spawn(async move {
            while let Some(next) = watch.changed().await {
                match next {
                    Ok(addrs) => {
                        let _ = events.send(Event::Addresses {
                            name: watched.clone(),
                            gen,
                            addrs,
                        });
                    }
                    Err(e) => warn!(pod = %watched, error = %e, "cannot read the pod's addresses"),
                }
            }
        });
        info!(pod = %name, pod_id = id.0, netns = %spec.netns.display(), netns_cookie = cookie,
              cgroup = %spec.cgroup.display(), fail_mode = ?spec.fail_mode, mode = ?spec.mode,
              source = source.label(), addrs = ?claimed, exclude_ports = ?spec.exclude_ports,
              exclude_cidrs = ?spec.exclude_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
              exclude_inbound_ports = ?spec.exclude_inbound_ports, probe_ports = ?spec.probe_ports,
              "pod enrolled");
        Ok(Served {
            gen,
            spec: spec.clone(),
            source,
            pod,
            entry,
            links,
            netns_ident,
            addrs: claimed,
            _watchers: watchers,
            _identity_feed: identity_feed,
            addr_task,
            releasing: None,
            listeners: dups,
            adopted: replaced > 0,
            remove_after_drain: false,
        })
    }

    /// Whether the pod's loopback hops are spliced: it asked for acceleration and this
    /// kernel runs the splice.
    fn spliced(&self, spec: &PodSpec) -> bool {
        spec.accelerate && self.kernel.splice_off.is_none()
    }

    fn ensure_agent_sock_ops(&mut self) {
        if self.agent_sock_ops.is_some() {
            return;
        }
        // The agent's end of an accelerated hop is its own socket (its cgroup, not the
        // pod's): sock_ops must see it too. Detached when the agent exits.
        let attached = std::fs::File::open(&self.own_cgroup)
            .map_err(|e| e.to_string())
            .and_then(|dir| {
                crate::ebpf::attach_splice_track(&mut self.kernel, &dir)
                    .unwrap_or_else(|| unreachable!("called only with the splice loaded"))
                    .map_err(|e| e.to_string())
            });
        match attached {
            Ok(link) => {
                info!(cgroup = %self.own_cgroup.display(), "acceleration: sock_ops attached to the agent's cgroup");
                self.agent_sock_ops = Some(link);
            }
            Err(e) => {
                warn!(error = %e, "acceleration: cannot attach sock_ops to the agent's cgroup; the splice stays off")
            }
        }
    }

    /// Steers `ip` to `pod`, unless another served pod owns it (a pod cannot take a
    /// neighbour's address: the kernel key is the address alone).
    fn claim(&mut self, pod: &PodName, entry: &PodEntry, ip: IpAddr) -> bool {
        if let Some(owner) = self.owners.get(&ip) {
            if owner != pod {
                warn!(pod = %pod, address = %ip, owner = %owner,
                      "address conflict: the address belongs to another enrolled pod and is not steered for this one (its connections there are dropped)");
                self.shared.metrics.count("address_conflict");
                return false;
            }
            return true;
        }
        if let Err(e) = self.kernel.pods.add_address(entry, ip) {
            error!(pod = %pod, address = %ip, error = %e, "cannot steer an address of the pod");
            return false;
        }
        self.owners.insert(ip, pod.clone());
        true
    }

    fn unclaim(&mut self, pod: &PodName, ip: IpAddr) {
        if self.owners.get(&ip) == Some(pod) {
            self.owners.remove(&ip);
            self.kernel.pods.remove_address(ip);
        }
    }

    /// Applies a pod's new address set.
    pub(super) fn addresses(&mut self, name: &PodName, gen: u64, addrs: Addresses) {
        let Some(s) = self.served.get(name) else {
            return;
        };
        if s.gen != gen || s.releasing.is_some() {
            return;
        }
        let (old, entry) = (s.addrs.clone(), s.entry.clone());
        let mut now = Addresses::new();
        for ip in &addrs {
            if self.claim(name, &entry, *ip) {
                now.insert(*ip);
            }
        }
        for ip in old.difference(&addrs) {
            self.unclaim(name, *ip);
        }
        if now != old {
            info!(pod = %name, added = ?now.difference(&old).collect::<Vec<_>>(),
                  removed = ?old.difference(&now).collect::<Vec<_>>(), "pod addresses changed");
        }
        if let Some(s) = self.served.get_mut(name) {
            s.addrs = now;
        }
        self.publish();
    }

    /// Starts releasing a pod: its new connections stop reaching the agent at once
    /// (fail-open: they go direct; fail-closed: they are refused), then its open
    /// connections drain, up to the drain deadline.
    pub(super) fn release(
        &mut self,
        name: &str,
        reply: oneshot::Sender<ControlReply>,
        remove_after_drain: bool,
    ) {
        let Some(key) = self.served.keys().find(|n| n.as_str() == name).cloned() else {
            let what = if self.blocked.contains_key(name) {
                format!("pod {name} is not enrolled (it is blocked: enrol it again, or `agent uninstall --pod {name}` to unblock it)")
            } else {
                format!("pod {name} is not enrolled")
            };
            let _ = reply.send(Err(ControlError::NotFound(what)));
            return;
        };
        let s = self.served.get_mut(&key).expect("found above");
        if let Some(waiting) = &mut s.releasing {
            waiting.push(reply);
            return;
        }
        s.releasing = Some(vec![reply]);
        s.listeners.clear();
        s.remove_after_drain = remove_after_drain;
        s.addr_task.abort();
        let (gen, fail_mode, pod) = (s.gen, s.spec.fail_mode, s.pod.clone());
        match fail_mode {
            FailMode::Closed => self.block(&key),
            FailMode::Open => self.detach(&key),
        }
        info!(pod = %key, fail_mode = ?fail_mode, "releasing the pod: draining its connections");
        let (events, deadline) = (self.events.clone(), self.settings.drain_timeout);
        tokio::spawn(async move {
            let (open, cut) = pod.life.drain(deadline).await;
            let _ = events.send(Event::Drained {
                name: key,
                gen,
                open,
                cut,
            });
        });
        self.publish();
    }

    /// A fail-closed pod's connects are refused from now on (inbound needs no switch: once
    /// its listeners close, sk_lookup finds no socket and drops).
    fn block(&mut self, name: &PodName) {
        let Some(s) = self.served.get(name) else {
            return;
        };
        let mut blocked = s.entry.config;
        blocked.flags |= POD_FLAG_BLOCK;
        if let Err(e) = self.kernel.pods.set_config(s.entry.netns_cookie, blocked) {
            error!(pod = %name, error = %e, "cannot switch the pod to blocking");
        }
    }

    /// A fail-open pod's traffic goes direct from now on.
    fn detach(&mut self, name: &PodName) {
        let Some(s) = self.served.get_mut(name) else {
            return;
        };
        let links = std::mem::replace(&mut s.links, PodLinks::none());
        links.detach();
        let (entry, addrs) = (s.entry.clone(), s.addrs.clone());
        self.kernel.pods.remove(&entry);
        for ip in addrs {
            self.unclaim(name, ip);
        }
    }

    /// A release finished draining.
    pub(super) fn drained(&mut self, name: &PodName, gen: u64, open: usize, cut: usize) {
        if self.served.get(name).is_none_or(|s| s.gen != gen) {
            return;
        }
        let mut s = self.served.remove(name).expect("checked above");
        let waiting = s.releasing.take().unwrap_or_default();
        let fail_mode = s.spec.fail_mode;
        if s.remove_after_drain {
            info!(pod = %name, "pod released and removed (the runtime deleted it): nothing left attached");
            self.forget(s);
        } else if fail_mode == FailMode::Closed {
            self.park(
                s,
                "released (fail-closed): its connections are refused until it is enrolled again"
                    .into(),
            );
        } else {
            self.state.remove(name.as_str());
            info!(pod = %name, "pod released (fail-open): nothing left attached");
        }
        let reply = json!({"pod": name, "result": "released", "fail_mode": fail_mode,
                           "drained": open, "cut_at_deadline": cut});
        for w in waiting {
            let _ = w.send(Ok(reply.clone()));
        }
        self.publish();
    }

    /// Keeps a fail-closed pod blocked without serving it: its links stay pinned, its
    /// kernel entry stays (blocking, without exclusions or addresses: the kernel drops
    /// connections to addresses it does not know in an enrolled namespace).
    fn park(&mut self, mut s: Served, note: String) {
        let name = s.spec.name.clone();
        s.addr_task.abort();
        s.pod.life.stop_accepting.cancel();
        s.pod.life.abort.cancel();
        let mut blocked_cfg = s.entry.config;
        blocked_cfg.flags |= POD_FLAG_BLOCK;
        self.kernel.pods.remove_exclusions(&s.entry);
        if let Err(e) = self
            .kernel
            .pods
            .set_config(s.entry.netns_cookie, blocked_cfg)
        {
            error!(pod = %name, error = %e, "cannot switch the pod to blocking");
        }
        for ip in s.addrs.clone() {
            self.unclaim(&name, ip);
        }
        let links = std::mem::replace(&mut s.links, PodLinks::none());
        links.leave_pinned();
        let record = Record::new(
            s.pod.id,
            s.source.origin(),
            Status::Blocked,
            s.netns_ident,
            s.spec.request.clone(),
        );
        if let Err(e) = self.state.write(name.as_str(), &record) {
            error!(pod = %name, error = %e, "cannot record the pod as blocked");
        }
        info!(pod = %name, "pod released (fail-closed): its TCP connections are refused until an agent adopts it or `agent uninstall` runs");
        self.blocked.insert(
            name.to_string(),
            Blocked {
                id: Some(s.pod.id),
                netns: Some((s.spec.netns.clone(), s.netns_ident)),
                cgroup: Some(s.spec.cgroup.clone()),
                record: Some(record),
                entry: Some(s.entry.clone()),
                note,
            },
        );
    }

    /// Once a second: pods whose network namespace is gone (deleted without a release)
    /// are released by the agent itself, and nothing of them is left behind.
    pub(super) fn reap(&mut self) {
        let gone: Vec<PodName> = self
            .served
            .iter()
            .filter(|(_, s)| !s.pod.netns.still_at_path())
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            let s = self.served.remove(&name).expect("listed above");
            let populated = cgroup_populated(&s.spec.cgroup);
            if s.spec.fail_mode == FailMode::Closed && populated {
                warn!(pod = %name, netns = %s.spec.netns.display(), cgroup = %s.spec.cgroup.display(),
                      "the pod's network namespace is gone but its cgroup still has processes: kept blocked");
                self.park(
                    s,
                    "network namespace gone while its cgroup still has processes".into(),
                );
                continue;
            }
            info!(pod = %name, netns = %s.spec.netns.display(),
                  "the pod's network namespace is gone: releasing it");
            self.forget(s);
        }
        let vanished: Vec<String> = self
            .blocked
            .iter()
            .filter(|(_, b)| {
                b.netns
                    .as_ref()
                    .is_some_and(|(path, ident)| !same_netns(path, *ident))
                    && b.cgroup.as_deref().is_none_or(|c| !cgroup_populated(c))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in vanished {
            let b = self.blocked.remove(&name).expect("listed above");
            info!(pod = %name, "a blocked pod's network namespace is gone: removing its pins");
            self.remove_blocked(&name, b);
        }
        self.publish();
    }

    /// Drops a blocked pod entirely: pins, kernel entry, record.
    pub(super) fn remove_blocked(&mut self, name: &str, b: Blocked) {
        if let Some(entry) = &b.entry {
            self.kernel.pods.remove(entry);
        }
        if let Err(e) = crate::ebpf::uninstall(&self.settings.pin_root, Some(name)) {
            error!(pod = %name, error = %e, "cannot remove the pod's pins");
        }
        self.state.remove(name);
    }

    /// Everything of a served pod goes at once (its namespace is gone: there is nothing
    /// left to protect or drain).
    fn forget(&mut self, mut s: Served) {
        let name = s.spec.name.clone();
        s.addr_task.abort();
        s.pod.life.stop_accepting.cancel();
        s.pod.life.abort.cancel();
        let links = std::mem::replace(&mut s.links, PodLinks::none());
        links.detach();
        self.kernel.pods.remove(&s.entry);
        for ip in s.addrs.clone() {
            self.unclaim(&name, ip);
        }
        self.state.remove(name.as_str());
        for w in s.releasing.take().unwrap_or_default() {
            let _ = w.send(Ok(
                json!({"pod": name, "result": "released", "reason": "netns gone"}),
            ));
        }
    }

    fn record(&self, s: &Served, status: Status) {
        let record = Record::new(
            s.pod.id,
            s.source.origin(),
            status,
            s.netns_ident,
            s.spec.request.clone(),
        );
        if let Err(e) = self.state.write(s.spec.name.as_str(), &record) {
            error!(pod = %s.spec.name, error = %e,
                   "the pod is served but a restarted agent will not re-adopt it");
        }
    }

    /// Replaces the admin view.
    pub(super) fn publish(&self) {
        let mut views = Vec::new();
        for (name, s) in &self.served {
            views.push(PodView {
                name: name.to_string(),
                pod_id: Some(s.pod.id),
                netns: s.spec.netns.clone(),
                netns_cookie: Some(s.entry.netns_cookie),
                cgroup: s.spec.cgroup.clone(),
                addresses: s.addrs.iter().copied().collect(),
                fail_mode: s.spec.fail_mode,
                mode: s.spec.mode,
                state: if s.releasing.is_some() {
                    "releasing"
                } else {
                    "enrolled"
                },
                source: s.source.label(),
                programs: programs_of(&s.spec, self.spliced(&s.spec)),
                kubernetes: s.spec.kubernetes.clone(),
                note: self
                    .kernel
                    .splice_off
                    .as_ref()
                    .filter(|_| s.spec.accelerate)
                    .map(|why| format!("served without the splice: {why}")),
                pod: Some(s.pod.clone()),
            });
        }
        for (name, b) in &self.blocked {
            let request = b.record.as_ref().map(|r| &r.request);
            views.push(PodView {
                name: name.clone(),
                pod_id: b.id,
                netns: request.map(|r| r.netns.clone()).unwrap_or_default(),
                netns_cookie: b.entry.as_ref().map(|e| e.netns_cookie),
                cgroup: request.map(|r| r.cgroup.clone()).unwrap_or_default(),
                addresses: Vec::new(),
                fail_mode: FailMode::Closed,
                mode: request.map(|r| r.mode).unwrap_or_default(),
                state: "blocked",
                source: "state",
                programs: vec![
                    "cgroup/connect4 (pinned)",
                    "cgroup/connect6 (pinned)",
                    "sk_lookup (pinned)",
                ],
                kubernetes: request.and_then(|r| r.kubernetes.clone()),
                note: Some(b.note.clone()),
                pod: None,
            });
        }
        self.admin.pods.store(Arc::new(views));
    }

    /// A clean stop: new connections stop reaching the listeners (fail-open pods lose
    /// their programs and go direct, fail-closed pods are switched to refusing), open
    /// connections drain up to `deadline`, and fail-closed pods stay pinned. Records stay,
    /// so the next agent re-adopts every pod.
    /// Drains every served pod at once; returns (connections open at the start, cut).
    async fn drain_all(&self, deadline: Duration) -> (usize, usize) {
        let lives: Vec<Arc<Pod>> = self.served.values().map(|s| s.pod.clone()).collect();
        let drains = lives.iter().map(|p| p.life.drain(deadline));
        let results = futures_util::future::join_all(drains).await;
        results
            .iter()
            .fold((0, 0), |(o, c), (po, pc)| (o + po, c + pc))
    }

    /// After a hot restart: the new agent serves every pod, on the same listening sockets
    /// and with its own programs attached. This one stops accepting, drains its open
    /// connections within `deadline`, and lets go of its links without unpinning (the pins
    /// are the new agent's now); it blocks, records and removes nothing.
    pub(super) async fn hand_over(mut self, deadline: Duration) {
        for s in self.served.values_mut() {
            s.listeners.clear();
            s.addr_task.abort();
        }
        let (open, cut) = self.drain_all(deadline).await;
        info!(
            drained = open,
            cut, "handed over: the previous agent's connections are done"
        );
        for (_, mut s) in std::mem::take(&mut self.served) {
            std::mem::replace(&mut s.links, PodLinks::none()).hand_over();
            for w in s.releasing.take().unwrap_or_default() {
                let _ = w.send(Err(ControlError::Failed(
                    "the agent was replaced while the pod drained".into(),
                )));
            }
        }
    }

    pub(super) async fn shutdown(mut self, deadline: Duration) {
        let names: Vec<PodName> = self.served.keys().cloned().collect();
        for s in self.served.values_mut() {
            s.listeners.clear();
        }
        for name in &names {
            let s = &self.served[name];
            info!(pod = %name, policy_reloads_ok = get(&s.pod.policy.reloads_ok),
                  policy_reloads_failed = get(&s.pod.policy.reloads_failed),
                  identity_reloads_ok = s.pod.tls.as_ref().map_or(0, |t| get(&t.store.reloads_ok)),
                  identity_reloads_failed = s.pod.tls.as_ref().map_or(0, |t| get(&t.store.reloads_failed)),
                  "reload counters");
            if s.releasing.is_none() {
                match s.spec.fail_mode {
                    FailMode::Closed => self.block(name),
                    FailMode::Open => self.detach(name),
                }
            }
        }
        let (open, cut) = self.drain_all(deadline).await;
        if cut > 0 {
            warn!(
                open = cut,
                deadline_ms = deadline.as_millis() as u64,
                "drain deadline passed: cut the remaining connections"
            );
        } else {
            info!(drained = open, "all connections finished");
        }
        for (name, mut s) in std::mem::take(&mut self.served) {
            s.addr_task.abort();
            let links = std::mem::replace(&mut s.links, PodLinks::none());
            match s.spec.fail_mode {
                FailMode::Closed => {
                    links.leave_pinned();
                    info!(pod = %name, "pod released (fail-closed): its TCP connections are refused until an agent adopts it or `agent uninstall` runs");
                }
                FailMode::Open => {
                    links.detach();
                    info!(pod = %name, "pod released (fail-open): nothing left attached");
                }
            }
            let status = if s.releasing.is_some() {
                // Stopped in the middle of a release: what the release would have left.
                match s.spec.fail_mode {
                    FailMode::Closed => Some(Status::Blocked),
                    FailMode::Open => None,
                }
            } else {
                Some(Status::Enrolled)
            };
            match status {
                Some(st) => self.record(&s, st),
                None => self.state.remove(name.as_str()),
            }
            for w in s.releasing.take().unwrap_or_default() {
                let _ = w.send(Err(ControlError::Failed(
                    "the agent stopped while the pod drained".into(),
                )));
            }
        }
    }
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// The kernel's view of a pod, derived from its spec.
pub(super) fn kernel_entry(spec: &PodSpec, id: PodId, cookie: u64, outbound_port: u16) -> PodEntry {
    let mut flags = 0;
    if spec.fail_mode == FailMode::Open {
        flags |= POD_FLAG_FAIL_OPEN;
    }
    if spec.accelerate {
        flags |= POD_FLAG_ACCELERATE;
    }
    if spec.mode == Mode::Strict {
        flags |= POD_FLAG_STRICT;
    }
    if spec.udp_outbound == UdpOutbound::Deny {
        flags |= POD_FLAG_UDP_DENY;
    }
    PodEntry {
        netns_cookie: cookie,
        config: KernelPod {
            pod_id: id.0,
            flags,
            outbound_port,
            _pad: [0; 6],
        },
        outbound_excluded_ports: spec.exclude_ports.clone(),
        outbound_excluded_cidrs: spec.exclude_cidrs.clone(),
        inbound_excluded_ports: spec.exclude_inbound_ports.clone(),
        probe_ports: spec.probe_ports.clone(),
        udp_allow_ports: spec.udp_allow_ports.clone(),
    }
}

/// What is attached for a pod, as `agent pods` shows it (`spliced`: the pod asked for
/// acceleration and this kernel runs the splice).
fn programs_of(spec: &PodSpec, spliced: bool) -> Vec<&'static str> {
    use crate::ebpf::{INBOUND_PROGRAM, REDIRECT_PROGRAMS, SPLICE_PROGRAMS};
    let mut p = Vec::new();
    if spec.redirect == Redirect::Ebpf {
        p.extend(REDIRECT_PROGRAMS);
    }
    p.push(INBOUND_PROGRAM);
    if spliced {
        p.extend(SPLICE_PROGRAMS);
    }
    p
}

/// Whether `path` still names the namespace with this (device, inode).
pub(super) fn same_netns(path: &Path, ident: (u64, u64)) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == ident)
}

/// Whether the cgroup (or one below it) still has processes.
fn cgroup_populated(cgroup: &Path) -> bool {
    std::fs::read_to_string(cgroup.join("cgroup.events"))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == "populated 1"))
}
