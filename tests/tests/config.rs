//! A bad configuration stops the agent at start, before it touches the kernel, with a
//! message naming the field and the reason. These need no privileges.

use std::process::Command;

use simnode::{cgroup2_root, workspace_bin};

/// Runs `agent run --config <text>` and returns (exit code, stderr).
fn run_with(config: &str) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(format!("agent-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{n}.toml"));
    std::fs::write(&path, config).unwrap();
    let out = Command::new(workspace_bin("agent"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run agent");
    let _ = std::fs::remove_file(&path);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An empty cgroup v2 directory below the root, removed on drop.
struct TempCgroup(std::path::PathBuf);

impl TempCgroup {
    fn new() -> Self {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = cgroup2_root().join(format!("agent-config-test-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("mkdir {}: {e} (needs root)", dir.display()));
        TempCgroup(dir)
    }
}

impl Drop for TempCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Like `assert_pod_rejected`, with a top-level line instead of a pod line.
fn assert_pod_rejected_top(top: &str, needles: &[&str]) {
    assert_rejected_with(top, "", needles);
}

/// A config with top-level lines `top` and one pod (whose netns and cgroup exist) with the
/// lines `pod`, which must be rejected.
fn assert_rejected_with(top: &str, pod: &str, needles: &[&str]) {
    if !simnode::require_root("config test with a temporary cgroup") {
        return;
    }
    let cg = TempCgroup::new();
    let config = format!(
        "{top}\n[[pod]]\nname = \"p\"\nnetns = \"/proc/self/ns/net\"\ncgroup = \"{}\"\n{pod}\n",
        cg.0.display()
    );
    assert_rejected(&config, needles);
}

/// Runs the agent with a pod whose netns and cgroup exist, so only the field under test is
/// bad, and checks the rejection.
fn assert_pod_rejected(extra: &str, needles: &[&str]) {
    if !simnode::require_root("config test with a temporary cgroup") {
        return;
    }
    let cg = TempCgroup::new();
    let config = format!(
        "[[pod]]\nname = \"p\"\nnetns = \"/proc/self/ns/net\"\ncgroup = \"{}\"\n{extra}\n",
        cg.0.display()
    );
    assert_rejected(&config, needles);
}

fn assert_rejected(config: &str, needles: &[&str]) {
    let (code, err) = run_with(config);
    assert_eq!(code, Some(2), "expected exit code 2, got {code:?}: {err}");
    assert!(err.contains("invalid configuration"), "{err}");
    for n in needles {
        assert!(err.contains(n), "message should mention {n:?}: {err}");
    }
}

#[test]
fn unknown_field() {
    assert_rejected(
        "outbound_port = 15001\nbogus_field = 1\n",
        &["bogus_field", "line 2"],
    );
}

#[test]
fn unknown_pod_field() {
    assert_pod_rejected("exclude = [1]", &["exclude", "unknown field"]);
}

#[test]
fn bad_cidr() {
    assert_pod_rejected(
        "exclude_cidrs = [\"10.0.0.0/33\"]",
        &["pod[0].exclude_cidrs[0]", "10.0.0.0/33", "not a CIDR"],
    );
}

#[test]
fn cidr_with_host_bits() {
    assert_pod_rejected(
        "exclude_cidrs = [\"10.1.2.3/8\"]",
        &["pod[0].exclude_cidrs[0]", "host bits", "10.0.0.0/8"],
    );
}

#[test]
fn missing_netns() {
    let cg = TempCgroup::new();
    let config = format!(
        "[[pod]]\nname = \"p\"\nnetns = \"/var/run/netns/no-such-pod-xyz\"\ncgroup = \"{}\"\n",
        cg.0.display()
    );
    assert_rejected(&config, &["pod[0].netns", "/var/run/netns/no-such-pod-xyz"]);
}

#[test]
fn netns_that_is_not_a_netns() {
    let cg = TempCgroup::new();
    let config = format!(
        "[[pod]]\nname = \"p\"\nnetns = \"/etc/hostname\"\ncgroup = \"{}\"\n",
        cg.0.display()
    );
    assert_rejected(&config, &["pod[0].netns", "not a network namespace"]);
}

#[test]
fn missing_cgroup() {
    let config = "[[pod]]\nname = \"p\"\nnetns = \"/proc/self/ns/net\"\ncgroup = \"/sys/fs/cgroup/no-such-pod-xyz\"\n";
    assert_rejected(config, &["pod[0].cgroup", "/sys/fs/cgroup/no-such-pod-xyz"]);
}

#[test]
fn bad_fail_mode_and_ports() {
    assert_pod_rejected("fail_mode = \"sometimes\"", &["fail_mode", "sometimes"]);
    assert_pod_rejected(
        "exclude_ports = [0]",
        &["pod[0].exclude_ports[0]", "port 0"],
    );
    assert_pod_rejected("probe_ports = [0]", &["pod[0].probe_ports[0]", "port 0"]);
    assert_pod_rejected("exclude_ports = [70000]", &["exclude_ports", "line"]);
}

#[test]
fn bad_probe_source() {
    let cg = TempCgroup::new();
    let config = format!(
        "probe_sources = [\"10.0.0.300\"]\n[[pod]]\nname = \"p\"\nnetns = \"/proc/self/ns/net\"\ncgroup = \"{}\"\n",
        cg.0.display()
    );
    assert_rejected(&config, &["probe_sources[0]", "10.0.0.300"]);
}

#[test]
fn root_cgroup_is_refused() {
    let config = format!(
        "[[pod]]\nname = \"p\"\nnetns = \"/proc/self/ns/net\"\ncgroup = \"{}\"\n",
        cgroup2_root().display()
    );
    assert_rejected(&config, &["pod[0].cgroup", "root of the cgroup hierarchy"]);
}

#[test]
fn admin_tcp_must_be_loopback() {
    assert_pod_rejected_top(
        "admin_tcp = \"0.0.0.0:15000\"",
        &["admin_tcp", "not a loopback address"],
    );
}

#[test]
fn bad_state_dir() {
    assert_pod_rejected_top("state_dir = \"relative/dir\"", &["state_dir", "absolute"]);
}

#[test]
fn iptables_redirect_needs_an_upstream_mark() {
    assert_pod_rejected(
        "redirect = \"iptables\"",
        &["pod[0].redirect", "upstream_mark", "loop"],
    );
}

#[test]
fn acceleration_needs_the_ebpf_redirect() {
    assert_rejected_with(
        "upstream_mark = 7",
        "redirect = \"iptables\"\naccelerate = true",
        &["pod[0].accelerate", "redirect = \"ebpf\""],
    );
}
