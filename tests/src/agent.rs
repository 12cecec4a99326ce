//! Running the real `agent` binary against a simulated node and reading its JSON logs.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{node::Pod, Node};

/// A binary of this workspace, built by `cargo xtask test` (or `cargo build`) beforehand.
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase());
    if let Ok(p) = std::env::var(&var) {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p agent -p simnode --bins`; `cargo xtask test` does) or set {var}",
        path.display()
    );
    path
}

/// The address space every simulated node's pods are numbered from (`node.rs`).
pub const MESH_V4: &str = "10.213.0.0/16";
pub const MESH_V6: &str = "fd00:213::/32";

const DEFAULT_LOG_LEVEL: &str = "info,agent_ebpf=debug";

/// Set (to anything) to run the whole functional suite with the splice on in every pod
/// that does not choose (it is off by default).
pub const ACCELERATE_ALL: &str = "SIMNODE_ACCELERATE";

/// How many programs a served eBPF pod that chooses neither `accelerate` nor `redirect` has
/// on its cgroup: connect4/6, sendmsg4/6 and record_orig_dst, and splice_track when the run
/// turns the splice on ([`ACCELERATE_ALL`]).
pub fn served_cgroup_programs() -> usize {
    5 + usize::from(std::env::var_os(ACCELERATE_ALL).is_some())
}

/// The agent's TOML config for a node, built up pod by pod as typed TOML values (lines a
/// test gives are parsed and merged: a later key replaces an earlier one).
pub struct AgentConfig {
    top: toml::Table,
    pods: Vec<toml::Table>,
    log_level: String,
    admin: PathBuf,
}

/// `key = value` lines as a table; a test's own lines, so a bad one is the test's bug.
fn parse_lines(lines: &str) -> toml::Table {
    lines
        .parse()
        .unwrap_or_else(|e| panic!("not TOML lines {lines:?}: {e}"))
}

fn path_value(p: &std::path::Path) -> toml::Value {
    toml::Value::String(p.display().to_string())
}

impl AgentConfig {
    /// A config for `node`. Pods without a policy of their own get an allow-all default,
    /// so tests about interception are not also tests about authorization (the agent's
    /// own default, with no policy at all, is deny).
    pub fn new(node: &Node) -> Self {
        Self::with_paths(
            node,
            node.pin_root(),
            &node.admin_socket(),
            &node.state_dir(),
        )
    }

    /// A config for a second agent on the same node (as if on another node): its own pin
    /// root, admin socket and state directory, named `name`.
    pub fn another(node: &Node, name: &str) -> Self {
        let pin_root = node.pin_root().join(name);
        let admin = node.tmp().join(format!("admin-{name}.sock"));
        let state = node.tmp().join(format!("state-{name}"));
        Self::with_paths(node, &pin_root, &admin, &state)
    }

    fn with_paths(
        node: &Node,
        pin_root: &std::path::Path,
        admin: &std::path::Path,
        state: &std::path::Path,
    ) -> Self {
        let allow_all = node.tmp().join("allow-all.yaml");
        std::fs::write(&allow_all, "default: all\n").expect("write the allow-all policy");
        let mut top = toml::Table::new();
        top.insert("pin_root".into(), path_value(pin_root));
        top.insert("drain_timeout_ms".into(), 3000.into());
        top.insert("connect_timeout_ms".into(), 3000.into());
        top.insert("default_policy".into(), path_value(&allow_all));
        top.insert("admin_socket".into(), path_value(admin));
        top.insert("state_dir".into(), path_value(state));
        AgentConfig {
            top,
            pods: Vec::new(),
            log_level: DEFAULT_LOG_LEVEL.into(),
            admin: admin.to_path_buf(),
        }
    }

    /// The agent's `--log-level` (tests read kernel debug events; the bench must not pay
    /// for them).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.into();
        self
    }

    /// Makes every simulated pod address part of the mesh (`mesh_networks`).
    pub fn mesh(self) -> Self {
        self.value("mesh_networks", vec![MESH_V4, MESH_V6])
    }

    /// Sets one top-level key.
    pub fn value(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.top.insert(key.into(), value.into());
        self
    }

    /// Sets the top-level keys of `key = value` lines.
    pub fn set(mut self, lines: &str) -> Self {
        self.top.extend(parse_lines(lines));
        self
    }

    pub fn pod(self, pod: &Pod, fail_mode: &str) -> Self {
        self.pod_extra(pod, fail_mode, "")
    }

    pub fn pod_with(self, pod: &Pod, fail_mode: &str, ports: &[u16], cidrs: &[&str]) -> Self {
        let mut t = toml::Table::new();
        let ports: Vec<i64> = ports.iter().map(|p| i64::from(*p)).collect();
        t.insert("exclude_ports".into(), ports.into());
        t.insert("exclude_cidrs".into(), cidrs.to_vec().into());
        self.pod_table(pod, fail_mode, t)
    }

    /// Adds a pod with extra `key = value` lines in its table.
    pub fn pod_extra(self, pod: &Pod, fail_mode: &str, extra: &str) -> Self {
        self.pod_table(pod, fail_mode, parse_lines(extra))
    }

    /// Adds a pod with these extra keys. Under [`ACCELERATE_ALL`], every pod that chooses
    /// neither `accelerate` nor `redirect` gets `accelerate = true`.
    pub fn pod_table(mut self, pod: &Pod, fail_mode: &str, extra: toml::Table) -> Self {
        let mut t = toml::Table::new();
        t.insert("name".into(), pod.name.clone().into());
        t.insert("netns".into(), path_value(&pod.netns_path));
        t.insert("cgroup".into(), path_value(&pod.cgroup));
        t.insert("fail_mode".into(), fail_mode.into());
        let chooses = extra.contains_key("accelerate") || extra.contains_key("redirect");
        t.extend(extra);
        if std::env::var_os(ACCELERATE_ALL).is_some() && !chooses {
            t.insert("accelerate".into(), true.into());
        }
        self.pods.push(t);
        self
    }

    pub fn text(&self) -> String {
        let mut doc = self.top.clone();
        scale_timeouts(&mut doc);
        if !self.pods.is_empty() {
            let pods = self.pods.iter().cloned().map(toml::Value::Table).collect();
            doc.insert("pod".into(), toml::Value::Array(pods));
        }
        toml::to_string(&doc).expect("a TOML table serializes")
    }
}

/// The agent's own deadlines for a peer's progress, with the agent's defaults, stretched by
/// the run's time scale: under emulation a TLS handshake takes 20 times longer, and the
/// agent would give up on peers that are only slow.
const SCALED_TIMEOUTS: &[(&str, i64)] = &[
    ("connect_timeout_ms", 10_000),
    ("handshake_timeout_ms", 10_000),
    ("protocol_detect_timeout_ms", 1_000),
];

fn scale_timeouts(doc: &mut toml::Table) {
    let scale = i64::from(crate::time::scale());
    if scale == 1 {
        return;
    }
    for (key, default) in SCALED_TIMEOUTS {
        let ms = doc
            .get(*key)
            .and_then(toml::Value::as_integer)
            .unwrap_or(*default);
        doc.insert((*key).into(), (ms * scale).into());
    }
}

/// A running agent. Dropping it kills the process (pins are the node's to remove).
pub struct Agent {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    config: PathBuf,
    /// Its admin socket, when the config is one of ours.
    admin: Option<PathBuf>,
}

/// What a run of the `agent` command line printed, and how it exited.
#[derive(Debug)]
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// `agent enroll` for one pod of the simulated node, built up flag by flag.
#[derive(Debug, Clone)]
pub struct Enrol {
    name: String,
    args: Vec<std::ffi::OsString>,
}

impl Enrol {
    /// The pod's name, netns and cgroup; the agent's defaults for the rest (fail-closed,
    /// PERMISSIVE, the node's default policy). Under [`ACCELERATE_ALL`] the splice is on.
    pub fn pod(pod: &Pod) -> Self {
        let mut e = Self {
            name: pod.name.clone(),
            args: Vec::new(),
        };
        e = e
            .arg("--name", &pod.name)
            .arg("--netns", &pod.netns_path)
            .arg("--cgroup", &pod.cgroup);
        if std::env::var_os(ACCELERATE_ALL).is_some() {
            e.args.push("--accelerate".into());
        }
        e
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// One `--flag value` pair.
    pub fn arg(mut self, flag: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.args.push(flag.into());
        self.args.push(value.as_ref().to_os_string());
        self
    }

    pub fn fail_mode(self, mode: &str) -> Self {
        self.arg("--fail-mode", mode)
    }

    /// STRICT with this identity.
    pub fn strict(self, svid: &crate::pki::Svid) -> Self {
        self.identity(svid).arg("--mode", "strict")
    }

    pub fn identity(self, svid: &crate::pki::Svid) -> Self {
        self.arg("--identity-dir", &svid.dir)
    }
}

impl Agent {
    /// Starts `agent run` on the host with `config`, JSON logs at debug level.
    pub fn start(config: &AgentConfig) -> Agent {
        Self::start_cmd(Command::new(workspace_bin("agent")), config)
    }

    /// Starts the agent from a prepared command (e.g. one placed in a pod's sub-cgroup).
    pub fn start_cmd(cmd: Command, config: &AgentConfig) -> Agent {
        Self::start_cmd_args(cmd, config, &[])
    }

    /// [`Agent::start_cmd`] with extra arguments after `agent run --config FILE`.
    pub fn start_cmd_args(cmd: Command, config: &AgentConfig, extra: &[&str]) -> Agent {
        let path =
            std::env::temp_dir().join(format!("simnode-agent-{}.toml", crate::sys::run_id()));
        std::fs::write(&path, config.text()).expect("write agent config");
        let mut agent = Self::spawn(cmd, path, &config.log_level, extra);
        agent.admin = Some(config.admin.clone());
        agent
    }

    /// Starts `agent run` with a config file written by the caller (kept afterwards).
    pub fn start_file(config: &std::path::Path) -> Agent {
        let copy =
            std::env::temp_dir().join(format!("simnode-agent-{}.toml", crate::sys::run_id()));
        std::fs::copy(config, &copy).expect("copy agent config");
        Self::spawn(
            Command::new(workspace_bin("agent")),
            copy,
            DEFAULT_LOG_LEVEL,
            &[],
        )
    }

    fn spawn(mut cmd: Command, path: std::path::PathBuf, log_level: &str, extra: &[&str]) -> Agent {
        cmd.args(["run", "--config"])
            .arg(&path)
            .args(["--log-format", "json", "--log-level", log_level])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn agent");
        let stderr = child.stderr.take().expect("agent stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let agent = Agent {
            child: Some(child),
            lines,
            reader: Some(reader),
            config: path,
            admin: None,
        };
        agent.wait_for(
            "agent ready",
            |e| e["message"] == "agent ready",
            Duration::from_secs(30),
        );
        agent
    }

    /// Runs the `agent` command line against this agent's admin socket.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        self.run_cli(args.iter().map(std::ffi::OsStr::new))
    }

    /// `agent enroll ...`.
    pub fn enroll(&self, e: &Enrol) -> CliOutput {
        let flags = e.args.iter().map(|a| a.as_os_str());
        self.run_cli(std::iter::once(std::ffi::OsStr::new("enroll")).chain(flags))
    }

    fn run_cli<'a>(&self, args: impl IntoIterator<Item = &'a std::ffi::OsStr>) -> CliOutput {
        let admin = self
            .admin
            .as_ref()
            .expect("an agent started from an AgentConfig");
        let out = Command::new(workspace_bin("agent"))
            .args(args)
            .arg("--socket")
            .arg(admin)
            .output()
            .expect("run the agent CLI");
        CliOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `agent enroll ...`, which must succeed.
    pub fn enroll_ok(&self, e: &Enrol) -> CliOutput {
        let out = self.enroll(e);
        assert_eq!(
            out.code,
            Some(0),
            "agent enroll {} failed: {out:?}\nlog:\n{}",
            e.name,
            self.tail(40)
        );
        out
    }

    /// `agent pods -o json`, by name.
    pub fn pods(&self) -> Vec<Value> {
        let out = self.cli(&["pods", "-o", "json"]);
        assert_eq!(out.code, Some(0), "agent pods: {out:?}");
        out.json().as_array().cloned().unwrap_or_default()
    }

    /// `agent status -o json`.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "-o", "json"]);
        assert_eq!(out.code, Some(0), "agent status: {out:?}");
        out.json()
    }

    /// Why the splice is off on this kernel, as `agent status` says, or `None` when the
    /// kernel runs it.
    pub fn splice_unavailable(&self) -> Option<String> {
        let status = self.status();
        let splice = status["kernel"]["splice"]
            .as_str()
            .unwrap_or_else(|| panic!("agent status names no splice state: {status}"));
        splice.strip_prefix("unavailable: ").map(str::to_owned)
    }

    /// Every log line parsed as JSON (lines that are not JSON are skipped).
    pub fn events(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The access-log records: one per proxied connection.
    pub fn access(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["target"] == "access")
            .collect()
    }

    pub fn log_text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits for an event matching `pred`; panics with the log if it never comes.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        let timeout = crate::time::scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            let exited = self
                .child
                .as_ref()
                .map(|c| c.id())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
            if Instant::now() > deadline || exited {
                panic!(
                    "agent: no `{what}` within {timeout:?}; log:\n{}",
                    self.tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().unwrap();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM, then waits for a clean exit (panics after 20 s).
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        self.exit_within(Duration::from_secs(20), "of SIGTERM")
    }

    /// Waits for the agent to exit on its own (as after a handover); panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.exit_within(timeout, "")
    }

    fn exit_within(&mut self, timeout: Duration, of: &str) -> ExitStatus {
        let timeout = crate::time::scaled(timeout);
        let mut child = self.child.take().expect("agent already stopped");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait agent") {
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "agent did not stop within {timeout:?} {of}; log:\n{}",
                    self.tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends a signal to the running agent.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().expect("agent is running").id() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal the agent");
    }

    /// SIGKILL: what a crash or an OOM kill looks like.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config);
    }
}
