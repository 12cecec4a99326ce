//! The kernel under the agent. What it lacks stops the agent at start with one sentence
//! naming the feature and the release that has it (never a verifier dump), before anything
//! is attached; where everything is there it starts. `cargo xtask vm` runs this on Debian's
//! 5.10, which has no SO_NETNS_COOKIE (5.14), and the whole suite on 6.1 and 6.12.

mod common;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;
use simnode::{attached_programs, workspace_bin, Agent, AgentConfig, Node};

/// The first release with every feature the agent requires (SO_NETNS_COOKIE).
const REQUIRED: (u32, u32) = (5, 14);

fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("read /proc/sys/kernel/osrelease")
        .trim()
        .to_string()
}

/// (major, minor) of a release such as `5.10.0-46-amd64`.
fn version(release: &str) -> (u32, u32) {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (next(), next())
}

#[test]
fn the_agent_starts_or_names_what_this_kernel_lacks() {
    let Some(node) = node("kernel_features", &["a"]) else {
        return;
    };
    let a = node.pod("a");
    let config = AgentConfig::new(&node);
    let release = release();
    if version(&release) >= REQUIRED {
        let mut agent = Agent::start(&config);
        let status = agent.status();
        assert_eq!(status["kernel"]["release"], release.as_str(), "{status}");
        assert!(agent.stop().success());
        return;
    }
    eprintln!("kernel {release} lacks SO_NETNS_COOKIE: the agent must refuse to start");
    let (mut child, log) = agent_run(&node, &config, &[]);
    let deadline = Instant::now() + simnode::time::scaled(Duration::from_secs(10));
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait agent") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent kept running on {release}, which lacks SO_NETNS_COOKIE");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&log).expect("read the agent log");
    assert!(
        !status.success(),
        "the agent exited 0 on {release}:\n{stderr}"
    );
    let errors: Vec<Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "one error, not a dump:\n{stderr}");
    let error = errors[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!(
            "this kernel ({release}) cannot run the agent: SO_NETNS_COOKIE socket option"
        )) && error.ends_with("needs Linux 5.14 or later"),
        "{error}"
    );
    assert!(!stderr.contains("verifier"), "{stderr}");
    assert!(
        attached_programs(&a.cgroup).is_empty(),
        "nothing is attached before the check: {:?}",
        attached_programs(&a.cgroup)
    );
}

/// The kernel-side log level is a constant the verifier sees, so each level is a different
/// program to verify. Found in a VM: on 6.1 `connect4` was rejected at level 0 (`agent init`)
/// and accepted at level 4 (the suite's), so every level must load on every kernel.
#[test]
fn the_programs_load_at_every_kernel_log_level() {
    let Some(node) = node("kernel_log_levels", &["a"]) else {
        return;
    };
    if version(&release()) < REQUIRED {
        return; // the agent refuses this kernel (the test above)
    }
    let config = AgentConfig::new(&node);
    // The kernel level is the most verbose level the filter names: off 0 .. trace 5.
    for level in ["off", "error", "warn", "info", "debug", "trace"] {
        let (mut child, log) = agent_run(&node, &config, &["--log-level", level]);
        let deadline = Instant::now() + simnode::time::scaled(Duration::from_secs(20));
        let ready = loop {
            let status = Command::new(workspace_bin("agent"))
                .args(["status", "-o", "json", "--socket"])
                .arg(node.admin_socket())
                .output()
                .expect("agent status");
            let up =
                serde_json::from_slice::<Value>(&status.stdout).is_ok_and(|s| s["ready"] == true);
            if up {
                break true;
            }
            if child.try_wait().expect("wait agent").is_some() || Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let exit = child.wait().expect("wait agent");
        let all = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = all.lines().collect();
        let stderr = lines[lines.len().saturating_sub(30)..].join("\n");
        assert!(
            ready,
            "--log-level {level}: the agent never got ready ({exit}):\n{stderr}"
        );
        assert!(exit.success(), "--log-level {level}: {exit}\n{stderr}");
    }
}

/// `agent run` with `config` and JSON logs into a file of the node's (a file, not a pipe:
/// nothing reads it while the agent runs), which is returned with the process.
fn agent_run(node: &Node, config: &AgentConfig, extra: &[&str]) -> (Child, PathBuf) {
    let path = node.tmp().join("agent.toml");
    std::fs::write(&path, config.text()).expect("write the agent config");
    let log = node.tmp().join("agent.log");
    let sink = std::fs::File::create(&log).expect("create the agent log");
    let child = Command::new(workspace_bin("agent"))
        .args(["run", "--config"])
        .arg(&path)
        .args(["--log-format", "json"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(sink)
        .spawn()
        .expect("spawn agent");
    (child, log)
}

#[test]
fn kernel_versions_compare_by_major_and_minor() {
    assert_eq!(version("5.10.0-46-amd64"), (5, 10));
    assert_eq!(version("6.12.118+deb12-amd64"), (6, 12));
    assert!(version("5.10.0-46-amd64") < REQUIRED);
    assert!(version("6.1.0-57-amd64") >= REQUIRED);
}
