//! Least privilege as an application in an enrolled pod sees it: a process that is not
//! root can neither read the pod's private key nor talk to the agent's admin API.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use simnode::{pki::DevCa, Agent, AgentConfig, Enrol};

/// Lets others traverse (not list) `dir`, so that only the file's own mode decides.
fn traversable(dir: &std::path::Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
}

#[test]
fn a_non_root_process_in_an_enrolled_pod_cannot_read_keys_or_use_the_admin_socket() {
    let Some(node) = node("privilege_non_root", &["a"]) else {
        return;
    };
    let a = node.pod("a");
    let ca = DevCa::new(&node.tmp().join("ca"));
    let svid = ca.issue(
        "spiffe://td.test/ns/default/sa/a",
        &node.tmp().join("a"),
        false,
    );
    let mut agent = Agent::start(&AgentConfig::new(&node).pod_extra(a, "closed", &svid.toml()));
    for dir in [node.tmp(), &node.tmp().join("a")] {
        traversable(dir);
    }
    let key = svid.key();
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key {} is mode {mode:o}", key.display());
    let socket = node.admin_socket();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the admin socket is mode {mode:o}");

    // As `nobody`, inside the pod's cgroup and network namespace.
    let as_nobody = |program: &str, args: &[&str]| {
        let out = a
            .command("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                program,
            ])
            .args(args)
            .output()
            .expect("run setpriv");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = as_nobody("cat", &[&key.display().to_string()]);
    assert_ne!(code, Some(0), "nobody read the private key: {out}");
    assert!(out.contains("Permission denied"), "{out}");
    assert!(!out.contains("PRIVATE KEY"), "{out}");

    let sock = socket.display().to_string();
    // The same request both times: only who asks differs.
    let status_request = [
        "-sS",
        "--max-time",
        "5",
        "--unix-socket",
        &sock,
        "http://agent/status",
    ];
    let (code, out) = as_nobody("curl", &status_request);
    assert_ne!(code, Some(0), "nobody reached the admin API: {out}");
    assert!(
        out.contains("Permission denied") || out.contains("Couldn't connect"),
        "{out}"
    );
    // The same request as root works, so the refusal above is the permission, not the URL.
    let root = std::process::Command::new("curl")
        .args(status_request)
        .output()
        .unwrap();
    assert!(root.status.success(), "{root:?}");
    assert!(agent.stop().success());
}

/// The capability sets of every thread of process `pid`, by name (`CapEff`, ...).
fn thread_caps(pid: u32) -> Vec<std::collections::BTreeMap<String, u64>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the agent's threads");
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter_map(|l| l.split_once(":\t"))
                .filter(|(k, _)| k.starts_with("Cap"))
                .map(|(k, v)| (k.to_string(), u64::from_str_radix(v.trim(), 16).unwrap()))
                .collect()
        })
        .collect()
}

#[test]
fn the_agent_keeps_only_the_capabilities_it_documents_and_still_enrols_pods() {
    let Some(node) = node("privilege_caps", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    let mut agent = Agent::start(&AgentConfig::new(&node));
    // CAP_NET_ADMIN 12, CAP_SYS_PTRACE 19, CAP_SYS_ADMIN 21, CAP_PERFMON 38, CAP_BPF 39: the
    // README's list.
    let kept: u64 = (1 << 12) | (1 << 19) | (1 << 21) | (1 << 38) | (1 << 39);
    let threads = thread_caps(agent.pid().expect("running"));
    assert!(threads.len() > 1, "the runtime's threads are missing");
    for caps in &threads {
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(caps[set], kept, "{set} of a thread: {caps:x?}");
        }
        assert_eq!((caps["CapInh"], caps["CapAmb"]), (0, 0), "{caps:x?}");
    }
    let logged = agent.wait_for(
        "capabilities dropped",
        |e| e["message"] == "capabilities dropped",
        WAIT,
    );
    println!("agent threads: {}, {logged}", threads.len());
    // What it kept is enough for its work at runtime: enrol two pods, attach, setns,
    // proxy a connection between them.
    agent.enroll_ok(&Enrol::pod(a));
    agent.enroll_ok(&Enrol::pod(b));
    let to = at(b, false, 8080);
    let r = a.client(to, &[]);
    let r = only(&r.results);
    assert!(redirected(r), "not redirected: {r:?}");
    record(&agent, &r.local, to);
    assert!(agent.stop().success());
}
