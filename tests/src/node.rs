//! The node (bridge + cgroup root + bpffs pin root) and its pods (netns + veth + cgroup).

use std::{
    ffi::OsStr,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::sys::{cgroup2_root, run, run_id, run_quiet};

/// A simulated node. Dropping it removes every pod, the bridge, the cgroups and the pins.
pub struct Node {
    pub id: String,
    bridge: String,
    subnet: u8,
    cgroup: PathBuf,
    pin_root: PathBuf,
    tmp: PathBuf,
    pods: Vec<Pod>,
}

/// One pod: a network namespace wired to the node's bridge, and a cgroup. A clone is a
/// handle to the same pod (the node tears it down).
#[derive(Clone)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub netns_path: PathBuf,
    pub cgroup: PathBuf,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// A Kubernetes-style UID, unique to this run.
    pub uid: String,
}

/// Where a pod's cgroup is made.
#[derive(Clone, Copy)]
enum Layout {
    /// `<node cgroup>/pod-NAME`.
    Plain,
    /// As the kubelet's cgroupfs driver lays it out under its cgroup root, for the QoS
    /// class given (`guaranteed`, `burstable`, `besteffort`).
    Kubelet(&'static str),
}

impl Node {
    /// Builds a node with the named pods (addresses .2, .3, ... in the order given).
    pub fn new(pods: &[&str]) -> Node {
        let plain: Vec<(&str, Layout)> = pods.iter().map(|p| (*p, Layout::Plain)).collect();
        Self::build(&plain)
    }

    /// A node whose pods' cgroups are where the kubelet's cgroupfs driver puts them, below
    /// [`Node::kubelet_cgroup_root`], by QoS class (`guaranteed`, `burstable`,
    /// `besteffort`).
    pub fn kubelet(pods: &[(&str, &'static str)]) -> Node {
        let laid: Vec<(&str, Layout)> =
            pods.iter().map(|(p, q)| (*p, Layout::Kubelet(q))).collect();
        Self::build(&laid)
    }

    /// The kubelet's cgroup root of a [`Node::kubelet`] node.
    pub fn kubelet_cgroup_root(&self) -> PathBuf {
        self.cgroup.join("kubelet")
    }

    fn build(pods: &[(&str, Layout)]) -> Node {
        let id = run_id();
        let subnet = free_subnet(&id);
        let bridge = format!("snb{id}");
        let cgroup = cgroup2_root().join(format!("simnode-{id}"));
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/simnode-{id}"));
        let tmp = std::env::temp_dir().join(format!("simnode-{id}"));
        // From here on, Drop cleans up whatever was created, even if a later step panics.
        let mut node = Node {
            id,
            bridge,
            subnet,
            cgroup,
            pin_root,
            tmp,
            pods: Vec::new(),
        };
        std::fs::create_dir_all(&node.tmp).expect("create the node's temp directory");
        ensure_bpffs();
        std::fs::create_dir(&node.cgroup)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", node.cgroup.display()));
        run("ip", &["link", "add", &node.bridge, "type", "bridge"]);
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", node.ip4()),
                "dev",
                &node.bridge,
            ],
        );
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/64", node.ip6()),
                "dev",
                &node.bridge,
                "nodad",
            ],
        );
        run("ip", &["link", "set", &node.bridge, "up"]);
        for (i, (name, layout)) in pods.iter().enumerate() {
            node.add_pod(name, i as u8 + 2, *layout);
        }
        node
    }

    /// The third octet of this node's 10.213.x.0/24 (free on this machine; a container
    /// runtime's pod network uses 10.214.x.0/24).
    pub fn subnet(&self) -> u8 {
        self.subnet
    }

    /// The node's own address on the bridge (where kubelet probes come from).
    pub fn ip4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 1)
    }

    pub fn ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x213, u16::from(self.subnet), 0, 0, 0, 0, 1)
    }

    /// The bridge's interface index on the host (the scope of a link-local destination
    /// reached from the node).
    pub fn bridge_index(&self) -> u32 {
        let path = format!("/sys/class/net/{}/ifindex", self.bridge);
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("cannot read {path}"))
    }

    /// A bpffs directory private to this node, for the agent's pins.
    pub fn pin_root(&self) -> &Path {
        &self.pin_root
    }

    /// The kernel maps of this node's agent as `agent maps -o json` reads them from its
    /// pins (it works while the agent is down, too).
    pub fn kernel_maps(&self) -> serde_json::Value {
        let out = Command::new(crate::workspace_bin("agent"))
            .args(["maps", "-o", "json", "--pin-root"])
            .arg(&self.pin_root)
            .output()
            .expect("run agent maps");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "agent maps printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Where the agent of this node serves its admin API.
    pub fn admin_socket(&self) -> PathBuf {
        self.tmp.join("admin.sock")
    }

    /// Where this node's agent records the pods it enrolled.
    pub fn state_dir(&self) -> PathBuf {
        self.tmp.join("state")
    }

    /// A scratch directory for this node's files (certificates, configs); removed on drop.
    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} on this node"))
    }

    fn add_pod(&mut self, name: &str, host: u8, layout: Layout) {
        let uid = format!(
            "{:08x}-{}-4{:03x}-8000-{:012x}",
            u32::from_str_radix(&self.id, 16).unwrap_or(0),
            "0000",
            host,
            u64::from(host)
        );
        let netns = format!("sn{}-{name}", self.id);
        let veth = format!("sv{}{host}", self.id);
        let pod = Pod {
            name: name.to_string(),
            netns_path: PathBuf::from(format!("/var/run/netns/{netns}")),
            netns: netns.clone(),
            cgroup: match layout {
                Layout::Plain => self.cgroup.join(format!("pod-{name}")),
                Layout::Kubelet("guaranteed") => self
                    .kubelet_cgroup_root()
                    .join(format!("kubepods/pod{uid}")),
                Layout::Kubelet(qos) => self
                    .kubelet_cgroup_root()
                    .join(format!("kubepods/{qos}/pod{uid}")),
            },
            uid,
            ip4: Ipv4Addr::new(10, 213, self.subnet, host),
            ip6: Ipv6Addr::new(
                0xfd00,
                0x213,
                u16::from(self.subnet),
                0,
                0,
                0,
                0,
                u16::from(host),
            ),
        };
        run("ip", &["netns", "add", &netns]);
        std::fs::create_dir_all(&pod.cgroup)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", pod.cgroup.display()));
        let (ip4, ip6) = (format!("{}/24", pod.ip4), format!("{}/64", pod.ip6));
        self.pods.push(pod);
        run(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        );
        run("ip", &["link", "set", &veth, "master", &self.bridge, "up"]);
        for args in [
            vec!["addr", "add", &ip4, "dev", "eth0"],
            vec!["addr", "add", &ip6, "dev", "eth0", "nodad"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut full = vec!["-n", netns.as_str()];
            full.extend(args);
            run("ip", &full);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for pod in self.pods.drain(..) {
            pod.teardown();
        }
        run_quiet("ip", &["link", "del", &self.bridge]);
        remove_cgroup_tree(&self.cgroup);
        remove_pins(&self.pin_root);
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

impl Pod {
    /// A command whose process starts inside this pod's cgroup and network namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(Some(&self.cgroup), Some(&self.netns_path), program)
    }

    /// A sub-cgroup of the pod (a container's cgroup in Kubernetes terms), created if needed.
    pub fn sub_cgroup(&self, name: &str) -> PathBuf {
        let dir = self.cgroup.join(name);
        if !dir.exists() {
            std::fs::create_dir(&dir)
                .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", dir.display()));
        }
        dir
    }

    /// Runs `f` on a new thread inside the pod's network namespace. Threads cannot join a
    /// cgroup v2 domain on their own, so use [`Pod::command`] where the cgroup matters.
    pub fn in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let ns = File::open(&self.netns_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.netns_path.display()));
        std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into pod");
            f()
        })
    }

    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ip6)
        } else {
            IpAddr::V4(self.ip4)
        }
    }

    /// Runs `ip ARGS` inside the pod's network namespace (as a pod with NET_ADMIN could):
    /// e.g. `["addr", "add", "10.213.1.99/24", "dev", "eth0"]`.
    pub fn ip_in(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.netns.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Deletes the pod's network namespace as a runtime does when a pod goes away (the bind
    /// mount under /var/run/netns disappears; whoever still holds it keeps it alive).
    pub fn delete_netns(&self) {
        run("ip", &["netns", "del", &self.netns]);
    }

    /// The inode of the pod's network namespace (what BPF netns links report).
    pub fn netns_ino(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.netns_path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.netns_path.display()))
            .ino()
    }

    fn teardown(self) {
        remove_cgroup_tree(&self.cgroup);
        run_quiet("ip", &["netns", "del", &self.netns]);
    }
}

/// A command that starts in the given cgroup and/or network namespace. The child joins the
/// cgroup before entering the netns and before exec, so the program never runs outside.
#[allow(
    unsafe_code,
    reason = "pre_exec is unsafe: the hook only calls async-signal-safe write(2) and setns(2)"
)]
pub fn command_in(
    cgroup: Option<&Path>,
    netns: Option<&Path>,
    program: impl AsRef<OsStr>,
) -> Command {
    let mut cmd = Command::new(program);
    let procs = cgroup.map(|c| {
        File::options()
            .write(true)
            .open(c.join("cgroup.procs"))
            .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", c.display()))
    });
    let ns = netns.map(|n| File::open(n).unwrap_or_else(|e| panic!("open {}: {e}", n.display())));
    // SAFETY: the hook only calls write(2) and setns(2), both async-signal-safe, on fds
    // opened before fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                // "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(ns) = &ns {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Kills every process in the tree and removes the cgroups, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        remove_children(dir);
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() > deadline => {
                eprintln!("simnode: cannot remove cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn remove_children(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_children(&e.path());
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// Unlinking a pinned link detaches it; then the directories go.
pub(crate) fn remove_pins(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            remove_pins(&p);
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn ensure_bpffs() {
    let st = nix::sys::statfs::statfs("/sys/fs/bpf").expect("statfs /sys/fs/bpf");
    if st.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
        run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]);
    }
}

/// Picks a /24 in 10.213.0.0/16 that no interface on the host uses.
fn free_subnet(id: &str) -> u8 {
    let addrs = run("ip", &["-o", "addr", "show"]);
    let start = u32::from_str_radix(id, 16).unwrap_or(0) % 250;
    (0..250)
        .map(|i| ((start + i) % 250 + 2) as u8)
        .find(|k| !addrs.contains(&format!("10.213.{k}.")))
        .expect("no free 10.213.x.0/24 subnet for the simulated node")
}

/// Removes what crashed runs of the simulated node left behind (namespaces, bridges,
/// cgroups and pins with this library's prefixes). Returns what it removed. Only for use
/// when no other simulated node is running on the machine (`cargo xtask` calls it).
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    // A crashed runtime test's containerd and its shims (their command lines name our
    // scratch directory), then whatever they left mounted there.
    let tmp = std::env::temp_dir();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let ours = cmdline.contains(&format!("{}/simnode-", tmp.display()));
        if ours && (cmdline.starts_with("containerd") || cmdline.contains("containerd-shim")) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            removed.push(format!("process {pid} ({})", cmdline.trim()));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut stale: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&format!("{}/simnode-", tmp.display())))
        .collect();
    stale.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in stale {
        run_quiet("umount", &["-l", m]);
        removed.push(format!("mount {m}"));
    }
    let is_id = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_hexdigit());
    for line in run("ip", &["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name
            .strip_prefix("sn")
            .and_then(|r| r.split_once('-'))
            .is_some_and(|(id, _)| is_id(id))
        {
            run_quiet("ip", &["netns", "del", name]);
            removed.push(format!("netns {name}"));
        }
    }
    for line in run("ip", &["-o", "link", "show", "type", "bridge"]).lines() {
        let name = line.split(':').nth(1).unwrap_or("").trim();
        if name
            .strip_prefix("snb")
            .or(name.strip_prefix("snc"))
            .is_some_and(is_id)
        {
            run_quiet("ip", &["link", "del", name]);
            removed.push(format!("bridge {name}"));
        }
    }
    let sweep_dir = |root: &Path, removed: &mut Vec<String>, f: &dyn Fn(&Path)| {
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.strip_prefix("simnode-").is_some_and(is_id) {
                f(&e.path());
                removed.push(e.path().display().to_string());
            }
        }
    };
    sweep_dir(&cgroup2_root(), &mut removed, &remove_cgroup_tree);
    // A container runtime's pods also have cgroups in the v1 hierarchies of hybrid hosts.
    for m in crate::sys::cgroup_mounts() {
        if m != cgroup2_root() {
            sweep_dir(&m, &mut removed, &crate::sys::remove_cgroup_dirs);
        }
    }
    sweep_dir(Path::new("/sys/fs/bpf"), &mut removed, &remove_pins);
    removed
}
